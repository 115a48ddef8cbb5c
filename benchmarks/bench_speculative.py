"""Greedy speculative decoding (model/speculative.py) against the target's plain greedy generate().

One prompt at a time (batch 1), the case speculative decoding is for. The target is a
random-weight model with peaky logits (init_std 0.2, so its greedy text is varied, not one token
repeated); three drafts bound what a draft can do:

- **self**: the target as its own draft: every guess accepted, the upper bound of acceptance, and
  what the verify pass costs when nothing is wasted.
- **random**: an untrained small model: acceptance ~0, the lower bound (the draft's cost for
  nothing).
- **trained**: the same small shape trained for --steps steps on the target's own greedy
  continuations of other random prompts (a stand-in for `compress --method distill`; this
  distillation reached ~0% acceptance on a random target: docs/benchmarks.md).

With --markov-steps N the target (default init) is first trained N steps on walks of a fixed
random Markov chain (each id goes to one of two successors, 3:1), every prompt is a walk of it,
and the small "trained" draft learns the same walks for --steps steps instead of the target's
continuations: a target and a draft trained on one corpus, as a model family's sizes are, whose
greedy texts agree where both learned the chain's likelier successor.

Also timed, in the same round-robin: speculative decoding with transformers' draft-length
controls (schedule "heuristic", confidence 0.4) and with schedule "backoff" (heuristic, plus
pauses of the draft after fruitless one-guess rounds), and transformers' own greedy generate() and
assisted generation (generate(assistant_model=...), its defaults: up to 20 draft tokens,
confidence 0.4) on the same weights exported with save_pretrained; the ratios print at the end.

Each contender runs one untimed warm-up round, then --rounds timed ones. Every contender's
output is compared with plain greedy token for token; the run fails if one of ours differs
(transformers' rows may differ where fp32 rounding flips a near tie).

Run: `cd benchmarks && OMP_NUM_THREADS=1 PYTHONPATH=../src ../.venv/bin/python
bench_speculative.py [--markov-steps 200 --prompts 8]` (the speedup case: docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _rates import print_rates, time_round_robin
from bench_generate import hf_batched

from lmforge.model.config import preset_config
from lmforge.model.generate import generate, generate_batched
from lmforge.model.speculative import DraftStats, speculative_generate
from lmforge.model.transformer import Transformer


def make(seed: int, init_std: float = 0.2, **shape) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(preset_config("tiny", init_std=init_std, **shape)).eval()


def hf_copy(model: Transformer):
    """transformers' load of model's save_pretrained export (LlamaForCausalLM)."""
    from transformers import AutoModelForCausalLM

    from lmforge.model.convert import save_pretrained

    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, Path(tmp))
        return AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()


def prompts(n: int, vocab: int, seed: int, lo: int = 4, hi: int = 24) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)]


def plain(target: Transformer, rows: list[list[int]], new: int) -> list[list[int]]:
    return [
        generate(target, torch.tensor([p]), new, greedy=True)[0, len(p) :].tolist() for p in rows
    ]


def fit(model: Transformer, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float,
        batch: int = 32) -> float:  # fmt: skip
    """steps AdamW steps of next-token loss on random batches of rows of (x, y); last loss."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        pick = torch.randint(0, len(x), (batch,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[pick]).flatten(0, 1), y[pick].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


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
    return fit(draft, x, y, steps, lr)


def markov_rows(n: int, length: int, states: int, seed: int) -> list[list[int]]:
    """n walks of a fixed random chain over ids 1..states-1: each id goes to its first successor
    with p = 0.75, else its second (the same chain whatever the seed; seed picks the walks)."""
    succ = np.random.default_rng(1234).integers(1, states, (states, 2))
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        row = [int(rng.integers(1, states))]
        for _ in range(length - 1):
            row.append(int(succ[row[-1], int(rng.random() > 0.75)]))
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--train-prompts", type=int, default=512)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--markov-steps", type=int, default=0,
                    help="> 0: first train the target this many steps (batches of 16 walks of "
                    "32 tokens, lr 3e-3) on walks of a random Markov chain over 512 ids, draw "
                    "every prompt from the chain and train the small draft on the same walks")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(1)
    big = dict(n_layer=12, n_embd=512, intermediate_size=1408, n_head=8, n_kv_head=8)
    small = dict(n_layer=1, n_embd=128, intermediate_size=352)
    init_std = 0.02 if args.markov_steps else 0.2  # a trained model starts from the usual init
    target = make(0, init_std, **big)
    drafts = {"self": target, "random": make(1, **small), "trained": make(2, init_std, **small)}
    draw = prompts
    t0 = time.perf_counter()
    if args.markov_steps:
        walks = torch.tensor(markov_rows(1024, 33, 512, seed=2))
        x, y = walks[:, :-1], walks[:, 1:]
        loss = fit(target, x, y, args.markov_steps, lr=3e-3, batch=16)
        print(f"target: {args.markov_steps} steps on the chain in "
              f"{time.perf_counter() - t0:.0f} s, last loss {loss:.3f}")  # fmt: skip
        t0 = time.perf_counter()
        loss = fit(drafts["trained"], x, y, args.steps, lr=3e-3, batch=16)

        def draw(n: int, vocab: int, seed: int) -> list[list[int]]:
            return [w[: 4 + i % 21] for i, w in enumerate(markov_rows(n, 24, 512, seed))]

    else:
        loss = distill(drafts["trained"], target, draw(args.train_prompts, 4096, seed=1),
                       args.new_tokens, args.steps, lr=3e-3)  # fmt: skip
    print(f"trained draft: {args.steps} steps in {time.perf_counter() - t0:.0f} s, "
          f"last loss {loss:.3f}")  # fmt: skip
    for name, m in [("target", target), *drafts.items()]:
        print(f"{name}: {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M params")
    rows = draw(args.prompts, 4096, seed=0)
    hf_target, hf_drafts = hf_copy(target), {n: hf_copy(drafts[n]) for n in ("random", "trained")}
    stats: dict[str, DraftStats] = {}

    def spec(name: str, label: str, **controls):
        def run() -> list[list[int]]:
            stats[label] = DraftStats()
            out = []
            for p in rows:
                res = speculative_generate(target, drafts[name], p, args.new_tokens,
                                           draft_tokens=args.draft_tokens, **controls)  # fmt: skip
                stats[label].add(res.stats)
                out.append(res.tokens)
            return out

        return run

    def hf(assistant=None):
        kwargs = {} if assistant is None else {"assistant_model": hf_drafts[assistant]}
        return lambda: hf_batched(hf_target, rows, args.new_tokens, 1, **kwargs)

    adaptive = dict(schedule="heuristic", confidence=0.4)
    contenders = {"plain greedy": lambda: plain(target, rows, args.new_tokens)}
    contenders |= {
        f"speculative, {n} draft": spec(n, f"{n}, k={args.draft_tokens}") for n in drafts
    }
    backoff = dict(schedule="backoff", confidence=0.4)
    for n in ("random", "trained"):
        contenders[f"speculative heuristic, {n} draft"] = spec(n, f"{n}, heuristic", **adaptive)
        contenders[f"speculative backoff, {n} draft"] = spec(n, f"{n}, backoff", **backoff)
    contenders |= {"HF greedy": hf(), "HF assisted, random draft": hf("random"),
                   "HF assisted, trained draft": hf("trained")}  # fmt: skip
    # time_round_robin's untimed warm-up round keeps HF's set-up out of the times; spec()
    # resets its stats each call, so they are the last timed round's
    times, outputs = time_round_robin(contenders, args.rounds)
    ref = outputs["plain greedy"]
    differ = []
    for name, out in outputs.items():
        same = sum(a == b for a, b in zip(out, ref, strict=True))
        print(f"{name}: {same}/{len(ref)} rows equal to plain greedy")
        differ += [name] if same < len(ref) and not name.startswith("HF") else []
    for name, s in stats.items():
        print(f"{name}: acceptance {s.acceptance_rate:.1%} ({s.accepted}/{s.proposed}), "
              f"{s.tokens / s.target_passes:.2f} tokens per target pass")  # fmt: skip
    ratios = [(name, "plain greedy") for name in contenders if name != "plain greedy"]
    ratios += [(f"speculative{h}, {n} draft", f"HF assisted, {n} draft")
               for n in ("random", "trained") for h in ("", " heuristic", " backoff")]  # fmt: skip
    print_rates(times, args.prompts * args.new_tokens, ratios)
    if differ:  # ours must give plain greedy's answers: a speedup of others is none
        raise SystemExit(f"answers differ from plain greedy: {', '.join(differ)}")


if __name__ == "__main__":
    main()
