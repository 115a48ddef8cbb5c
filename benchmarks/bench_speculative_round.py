"""Where one speculative round's time goes (model/speculative.py), on bench_speculative's shapes.

Wraps speculative.py's own pieces with perf_counter timers and runs speculative_generate as it is:
- **draft**: _propose, the draft's k one-token steps (argmax and the host read included);
- **verify**: _logits, the target's one forward over its last token and the k guesses;
- **rest**: the call's wall time less both: the prefill, comparing guesses, bookkeeping, Python.
Next to it, the target's plain one-token step (generate()'s, through last_logits) and its forward
over 2..9 tokens at the same cache position, which bound what a round can save: a round of k
guesses pays k draft steps + one (k+1)-token forward for 1..k+1 tokens.

Run: `cd benchmarks && OMP_NUM_THREADS=1 PYTHONPATH=../src ../.venv/bin/python
bench_speculative_round.py`
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_speculative import make, prompts

from lmforge.model import speculative
from lmforge.model.generate import KVCache, last_logits


class Timed:
    """Replaces speculative.<name> with a wrapper that adds each call's wall time to .total."""

    def __init__(self, name: str) -> None:
        self.name, self.fn, self.total, self.calls = name, getattr(speculative, name), 0.0, 0
        setattr(speculative, name, self)

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.total += time.perf_counter() - t0
            self.calls += 1


def forward_ms(model, width: int, at: int = 40, repeats: int = 20) -> float:
    """Median ms of model's forward over width tokens at cache position at (lm_head on all)."""
    cache = KVCache.for_model(model, 1, at + width)
    with torch.no_grad():
        last_logits(model, torch.randint(1, 4000, (1, at)), kv_cache=cache)
        ids = torch.randint(1, 4000, (1, width))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.lm_head(model.hidden_states(ids, kv_cache=cache, start_pos=at))
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    target = make(0, n_layer=12, n_embd=512, intermediate_size=1408, n_head=8, n_kv_head=8)
    draft = make(1, n_layer=1, n_embd=128, intermediate_size=352)
    print("forward ms at position 40, by tokens: " + ", ".join(
        f"target {w}: {forward_ms(target, w):.1f}" for w in (1, 2, 3, 5, 9)))  # fmt: skip
    print(f"draft one-token step: {forward_ms(draft, 1):.2f} ms")
    rows = prompts(args.prompts, 4096, seed=0)
    print("\n| draft, k | rounds | ms/round: draft | verify | rest | whole | ms/token |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, model in (("self", target), ("small", draft)):
        for k in (1, 2, 4, 8):
            timers = [Timed("_propose"), Timed("_logits")]
            t0 = time.perf_counter()
            tokens = 0
            for p in rows:
                tokens += len(speculative.speculative_generate(
                    target, model, p, args.new_tokens, draft_tokens=k).tokens)  # fmt: skip
            wall = time.perf_counter() - t0
            for t in timers:
                setattr(speculative, t.name, t.fn)
            n = timers[1].calls
            draft_ms, verify_ms = (t.total / n * 1e3 for t in timers)
            whole = wall / n * 1e3
            print(f"| {name}, {k} | {n} | {draft_ms:.2f} | {verify_ms:.1f} | "
                  f"{whole - draft_ms - verify_ms:.2f} | {whole:.1f} | {wall / tokens * 1e3:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
