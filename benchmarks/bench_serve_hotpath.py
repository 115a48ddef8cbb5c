"""What a serving step spends outside the model when rows ask for rules, penalties and biases.

Runs an Engine over the `small` preset's body (4k vocabulary, random weights) on one thread with
N concurrent seeded sampled requests that each set repetition_penalty, a logit_bias, a stop
string and a stop token id, half of them also the checkpoint-style logits rules
(no_repeat_ngram_size, min_new_tokens); with --guided a quarter are also json_object-guided.
Requests have different max_tokens, so rows leave the batch at different steps. It times, per
decoding step: the whole step (Engine._decode: model forward + sampling + events), emit_tokens,
and inside it history_rules (emit.py), apply_logit_bias (sampling.py), guided_logits
(guided_rows.py) and, where it exists, the kept state's RowBatch.of and append (row_batch.py),
by wrapping those functions. It prints a digest of every request's tokens, so two checkouts
can be compared token for token (results: docs/benchmarks.md):

    cd benchmarks && OMP_NUM_THREADS=1 PYTHONPATH=../src ../.venv/bin/python \
        bench_serve_hotpath.py [--requests 32] [--rounds 3] [--guided]
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections import defaultdict

import numpy as np
import torch
from bench_serve_engine import small_engine

SPENT: dict[str, float] = defaultdict(float)  # function name -> seconds, over the timed rounds


def timed(owner, name: str) -> None:
    """Replaces owner.name by a wrapper that adds its wall time to SPENT[name]."""
    fn = getattr(owner, name)

    def wrapper(*args, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            SPENT[name] += time.perf_counter() - t0

    setattr(owner, name, wrapper)


def make_params(i: int, n_new: int, guide, rng):
    from lmforge.model.logits_rules import LogitsRules
    from lmforge.serve.sampling import SamplingParams

    rules = LogitsRules(no_repeat_ngram_size=3, min_new_tokens=4) if i % 2 else LogitsRules()
    bias = tuple(
        (int(t), float(b)) for t, b in zip(rng.integers(1, 4000, 4), (-5, 3, -100, 2), strict=True)
    )
    return SamplingParams(
        max_tokens=n_new, temperature=0.8, seed=i, ignore_eos=True, repetition_penalty=1.2,
        stop=("zzq",), stop_token_ids=(7,), logit_bias=bias, rules=rules,
        guide=guide if guide is not None and i % 4 == 0 else None,
    )  # fmt: skip


def run_round(engine, requests, tag: str) -> list[list[int]]:
    from lmforge.serve.engine import collect

    handles = [engine.submit(ids, p, f"{tag}{i}") for i, (ids, p) in enumerate(requests)]
    return [collect(h).token_ids for h in handles]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=32, help="concurrent requests")
    ap.add_argument("--new-tokens", type=int, default=64, help="most tokens per request")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--guided", action="store_true", help="a quarter of the rows json_object")
    args = ap.parse_args()

    from lmforge.constrain import compiler_for
    from lmforge.serve import emit, sampling, step_loop
    from lmforge.serve.engine import Engine

    engine = small_engine(args.requests)
    files, cfg = engine.files, engine.model.config
    torch.set_num_threads(1)  # after Engine(), which sizes the pool to the usable CPUs
    guide = compiler_for(files).compile("json_object", "") if args.guided else None
    rng = np.random.default_rng(1)
    requests = [
        (
            rng.integers(1, cfg.vocab_size, int(rng.integers(16, 97))).tolist(),
            make_params(
                i, int(rng.integers(args.new_tokens // 2, args.new_tokens + 1)), guide, rng
            ),
        )
        for i in range(args.requests)
    ]
    engine.start()
    run_round(engine, requests, "warm")  # warm-up: guide masks cached, allocator warm
    timings = [(Engine, "_decode"), (step_loop, "emit_tokens"), (emit, "history_rules"),
               (sampling, "apply_logit_bias"), (emit, "guided_logits")]  # fmt: skip
    if hasattr(emit, "RowBatch"):  # the kept per-batch state (absent before it was written)
        timings += [(emit.RowBatch, "of"), (emit.RowBatch, "append")]
    for owner, name in timings:
        timed(owner, name)
    steps0 = engine.stats().steps
    for r in range(args.rounds):
        outputs = run_round(engine, requests, f"r{r}-")
    steps = engine.stats().steps - steps0
    engine.shutdown()

    digest = hashlib.sha256(repr(outputs).encode()).hexdigest()[:16]
    print(f"{args.requests} requests ({'a quarter guided, ' if args.guided else ''}"
          f"{sum(len(o) for o in outputs)} tokens a round), {args.rounds} rounds, {steps} "
          f"decoding steps, torch {torch.__version__}, 1 thread; tokens digest {digest}")  # fmt: skip
    whole = SPENT["_decode"]
    print("| | ms/step | share of the step |\n|---|---:|---:|")
    for _, name in timings:
        print(f"| {name} | {1e3 * SPENT[name] / steps:.3f} | {SPENT[name] / whole:.1%} |")


if __name__ == "__main__":
    main()
