"""Cold mask walks at a 50k byte-level vocabulary: what a guide state never seen before costs the
engine's step, per state and per step of a burst of guided rows.

The vocabulary is bench_structured.py's (a byte-level BPE trained here on the Python standard
library's source; `--tokenizer PATH` reuses one saved by an earlier run). For each constraint,
rows seeded 0..rows-1 walk together as a batch would: every step computes each row's mask (what
serve/guided_rows.py does, on the engine's thread) and draws a random allowed token. The guide is
compiled afresh and not warmed, so every state's first mask is a cold walk: their times give
p50/p99 per cold state, and each step's total the stall a batch of `rows` sees.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_guided_cold.py [--rows 8] [--steps 60]
        [--tokenizer /tmp/bpe50k.json] [--warm-seconds 0] [--memory-walks 150]

`--memory-walks N` instead measures what a json_object guide holds per automaton state besides
its masks (the cost behind guide.MAX_GUIDE_STATES): N random walks of up to 120 tokens that
prefer, 4 times in 10, a token opening a bracket or a value, and otherwise avoid closing ones,
traced by tracemalloc.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lmforge.constrain import GuideCompiler

sys.path.insert(0, str(Path(__file__).parent))
from bench_structured import SPECS, corpus, train_bpe


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def burst(
    compiler: GuideCompiler, kind: str, rows: int, steps: int, warm_seconds: float
) -> dict[str, float]:
    """Rows walking one fresh guide together; ms per cold state and per step (all rows' masks)."""
    t0 = time.perf_counter()
    guide = compiler.compile(kind, SPECS[kind], warm_seconds).tokens
    compile_ms = 1e3 * (time.perf_counter() - t0)
    rngs = [random.Random(seed) for seed in range(rows)]
    states = [guide.start] * rows
    cold, per_step = [], []
    for _ in range(steps):
        step = 0.0
        masks = []
        for state in states:
            new = not guide.has_mask(state)
            t0 = time.perf_counter()
            masks.append(guide.allowed(state))
            dt = 1e3 * (time.perf_counter() - t0)
            step += dt
            if new:
                cold.append(dt)
        per_step.append(step)
        for i, (rng, mask) in enumerate(zip(rngs, masks, strict=True)):
            ids = mask.nonzero().flatten().tolist()
            states[i] = guide.advance(states[i], rng.choice(ids)) if ids else guide.start
    return dict(
        compile_ms=compile_ms,
        cold=len(cold),
        cold_p50=percentile(cold, 0.5),
        cold_p99=percentile(cold, 0.99),
        cold_max=max(cold, default=0.0),
        step_mean=sum(per_step) / len(per_step),
        step_p99=percentile(per_step, 0.99),
        step_max=max(per_step),
    )


def memory_per_state(compiler: GuideCompiler, walks: int) -> None:
    """Prints the bytes a fresh json_object guide holds per automaton state, its masks aside,
    after each of `walks` random walks that nest (tracemalloc, after a collection)."""
    import tracemalloc

    tokens = compiler.vocab.tokens
    closes = np.array([b"}" in t for t in tokens])
    opens = np.array([t.endswith((b"[", b"{", b'":')) for t in tokens])
    rng = random.Random(0)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    guide = compiler.compile("json_object", "").tokens
    for walk in range(walks):
        state = guide.start
        for _ in range(120):
            mask = guide.allowed(state).numpy()
            pick = mask & opens if rng.random() < 0.4 and (mask & opens).any() else mask & ~closes
            ids = np.flatnonzero(pick if pick.any() else mask)
            if not ids.size:
                break
            state = guide.advance(state, int(rng.choice(ids)))
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
        masks = sum(m.numel() * m.element_size() for m in guide._masks.values())
        states = guide.automaton.size
        print(
            f"  walk {walk}: {states} automaton states, {len(guide._states)} guide states, "
            f"{len(guide._masks)} masks {masks / 1e6:.1f} MB, all {held / 1e6:.1f} MB: "
            f"{(held - masks) / states / 1e3:.1f} KB a state besides masks"
        )
    tracemalloc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--corpus-mb", type=float, default=20.0)
    ap.add_argument("--tokenizer", type=Path, help="a saved tokenizer.json (made if missing)")
    ap.add_argument("--warm-seconds", type=float, default=0.0, help="warm each guide first")
    ap.add_argument("--memory-walks", type=int, default=0, help="measure memory a state instead")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from tokenizers import Tokenizer

    if args.tokenizer and args.tokenizer.exists():
        tok = Tokenizer.from_file(str(args.tokenizer))
    else:
        tok = train_bpe(corpus(args.corpus_mb), args.vocab)
        if args.tokenizer:
            tok.save(str(args.tokenizer))
    t0 = time.perf_counter()
    compiler = GuideCompiler(tok)
    print(
        f"vocab {tok.get_vocab_size()}: token bytes + trie {time.perf_counter() - t0:.2f}s; "
        f"load average {os.getloadavg()[0]:.1f}"
        + ("" if args.memory_walks else f"; {args.rows} rows x {args.steps} steps")
    )
    if args.memory_walks:
        memory_per_state(compiler, args.memory_walks)
        return
    for kind in SPECS:
        r = burst(compiler, kind, args.rows, args.steps, args.warm_seconds)
        print(
            f"  {kind:12s} compile {r['compile_ms']:7.1f} ms | {r['cold']:3d} cold states: p50 "
            f"{r['cold_p50']:6.2f} p99 {r['cold_p99']:6.2f} max {r['cold_max']:6.2f} ms | step "
            f"(all rows) mean {r['step_mean']:6.2f} p99 {r['step_p99']:6.2f} max "
            f"{r['step_max']:6.2f} ms"
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
