"""Greedy speculative decoding (model/speculative.py) against the target's plain greedy generate().

One prompt at a time (batch 1), the case speculative decoding is for. The target is a
random-weight model with peaky logits (init_std 0.2, so its greedy text is varied, not one token
repeated); three drafts bound what a draft can do:

- **self**: the target as its own draft: every guess accepted, the upper bound of acceptance, and
  what the verify pass costs when nothing is wasted.
- **random**: an untrained small model: acceptance ~0, the lower bound (the draft's cost for
  nothing).
- **distilled**: the same small shape trained for --steps steps on the target's own greedy
  continuations of other random prompts (a stand-in for `compress --method distill`).

Every contender's output is checked equal to plain greedy token for token.

Run: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_speculative.py`
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _rates import print_rates, time_round_robin

from lmforge.model.config import preset_config
from lmforge.model.generate import generate, generate_batched
from lmforge.model.speculative import DraftStats, speculative_generate
from lmforge.model.transformer import Transformer


def make(seed: int, **shape) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(preset_config("tiny", init_std=0.2, **shape)).eval()


def prompts(n: int, vocab: int, seed: int, lo: int = 4, hi: int = 24) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)]


def plain(target: Transformer, rows: list[list[int]], new: int) -> list[list[int]]:
    return [
        generate(target, torch.tensor([p]), new, greedy=True)[0, len(p) :].tolist() for p in rows
    ]


def distill(draft: Transformer, target: Transformer, rows: list[list[int]], new: int, steps: int,
            lr: float) -> float:  # fmt: skip
    """Trains draft on the target's greedy continuations of rows (loss on the continuations);
    returns the last loss."""
    conts = generate_batched(target, rows, new, batch_size=64, greedy=True)
    seqs = [p + c for p, c in zip(rows, conts, strict=True)]
    width = max(len(s) for s in seqs)
    x = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    y = torch.full_like(x, -100)
    for i, (p, s) in enumerate(zip(rows, seqs, strict=True)):
        y[i, len(p) - 1 : len(s) - 1] = torch.tensor(s[len(p) :])
    draft.train()
    opt = torch.optim.AdamW(draft.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        pick = torch.randint(0, len(seqs), (32,), generator=g)
        loss = torch.nn.functional.cross_entropy(draft(x[pick]).flatten(0, 1), y[pick].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    draft.eval()
    return loss.item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--train-prompts", type=int, default=512)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    target = make(0, n_layer=12, n_embd=512, intermediate_size=1408, n_head=8, n_kv_head=8)
    small = dict(n_layer=1, n_embd=128, intermediate_size=352)
    drafts = {"self": target, "random": make(1, **small), "distilled": make(2, **small)}
    t0 = time.perf_counter()
    loss = distill(drafts["distilled"], target, prompts(args.train_prompts, 4096, seed=1),
                   args.new_tokens, args.steps, lr=3e-3)  # fmt: skip
    print(f"distilled draft: {args.steps} steps in {time.perf_counter() - t0:.0f} s, "
          f"last loss {loss:.3f}")  # fmt: skip
    for name, m in [("target", target), *drafts.items()]:
        print(f"{name}: {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M params")
    rows = prompts(args.prompts, 4096, seed=0)
    stats: dict[str, DraftStats] = {}

    def spec(name: str):
        def run() -> list[list[int]]:
            stats[name] = DraftStats()
            out = []
            for p in rows:
                res = speculative_generate(target, drafts[name], p, args.new_tokens,
                                           draft_tokens=args.draft_tokens)  # fmt: skip
                stats[name].add(res.stats)
                out.append(res.tokens)
            return out

        return run

    contenders = {"plain greedy": lambda: plain(target, rows, args.new_tokens)}
    contenders |= {f"speculative, {name} draft": spec(name) for name in drafts}
    times, outputs = time_round_robin(contenders, args.rounds)
    ref = outputs["plain greedy"]
    for name, out in outputs.items():
        same = sum(a == b for a, b in zip(out, ref, strict=True))
        print(f"{name}: {same}/{len(ref)} rows equal to plain greedy")
    for name, s in stats.items():
        print(f"{name} draft: acceptance {s.acceptance_rate:.1%} ({s.accepted}/{s.proposed}), "
              f"{s.tokens / s.target_passes:.2f} tokens per target pass")  # fmt: skip
    print_rates(times, args.prompts * args.new_tokens,
                [(f"speculative, {n} draft", "plain greedy") for n in drafts])  # fmt: skip


if __name__ == "__main__":
    main()
