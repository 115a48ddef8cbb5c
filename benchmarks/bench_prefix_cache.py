"""Automatic prefix caching: requests sharing a long system prompt, with the cache off and on.

Every request is one shared system prompt (--system tokens) plus a question of its own (16-48
tokens) and asks for --new-tokens greedy tokens (ignore_eos, so the work is fixed). Each round
runs the same requests on a fresh Engine per setting, so the cache starts empty and its first
request pays the whole prefill:

- **burst**: all requests submitted at once (continuous batching; with the cache on, the first
  admitted prompts fill it and the rest prefill only their questions);
- **one at a time**: each request submitted after the previous one finished.

It prints the median time to first token, the wall time of each setting and the ratios, the
prefix cache's hits, and checks that every answer is the same token for token with the cache on
and off. The model is the `small` preset's body (block_size 1024) with random weights and a 4k
vocabulary (bench_serve_engine.make_tokenizer).

Run: `PYTHONPATH=src .venv/bin/python benchmarks/bench_prefix_cache.py` (`--quick`: a smoke run)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_serve_engine import make_tokenizer


def make_requests(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    system = rng.integers(1, vocab, args.system).tolist()
    return [
        system + rng.integers(1, vocab, int(rng.integers(16, 49))).tolist()
        for _ in range(args.requests)
    ]


def run(engine, prompts: list[list[int]], n_new: int, burst: bool) -> tuple[list, list, float]:
    """(answers, each request's time to first token, wall time) of the prompts on `engine`."""
    from lmforge.serve.engine import SamplingParams, collect

    params = SamplingParams(max_tokens=n_new, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    if burst:
        handles = [engine.submit(p, params, f"b{i}") for i, p in enumerate(prompts)]
        answers = [collect(h).token_ids for h in handles]
    else:
        handles, answers = [], []
        for i, p in enumerate(prompts):
            handles.append(engine.submit(p, params, f"s{i}"))
            answers.append(collect(handles[-1]).token_ids)
    wall = time.perf_counter() - t0
    return answers, [h.first_token_at - h.submitted_at for h in handles], wall


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--system", type=int, default=768, help="shared system prompt (tokens)")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens per answer")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prefix-cache-mb", type=float, default=256, help="the 'on' setting")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 4 requests, 1 round")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.rounds, args.system = 4, 1, 128
    return args


def main() -> None:
    args = parse_args()
    from lmforge.model.config import preset_config
    from lmforge.model.transformer import Transformer
    from lmforge.serve.engine import Engine

    with tempfile.TemporaryDirectory() as tmp:
        files = make_tokenizer(4096, Path(tmp))
    torch.manual_seed(0)  # the random `small` body
    model = Transformer(preset_config("small", vocab_size=files.vocab_size)).eval()
    prompts = make_requests(args, files.vocab_size)
    print(f"model small body ({model.num_params() / 1e6:.1f}M params), {args.requests} requests: "
          f"{args.system}-token system prompt + 16-48 own tokens, {args.new_tokens} new tokens "
          f"each, {torch.get_num_threads()} threads, torch {torch.__version__}")  # fmt: skip

    settings = {"off": 0.0, "on": args.prefix_cache_mb}
    results: dict[tuple[str, str], list] = {}
    answers: dict[str, list] = {}
    for _ in range(args.rounds):
        for mode in ("burst", "one at a time"):
            for name, mb in settings.items():
                engine = Engine(model, files, name=name, max_batch_size=args.requests,
                                prefix_cache_mb=mb)  # fmt: skip
                engine.start()
                out, ttft, wall = run(engine, prompts, args.new_tokens, mode == "burst")
                prefix = engine.stats().prefix
                engine.shutdown()
                results.setdefault((mode, name), []).append((statistics.median(ttft), wall))
                answers.setdefault(name, []).append(out)
        print(f"  cache on, last engine: {prefix.hits} hits, {prefix.misses} misses, "
              f"{prefix.hit_tokens} prompt tokens reused, "
              f"{prefix.bytes / 2**20:.1f} MiB held")  # fmt: skip

    same = all(a == b for a, b in zip(answers["off"], answers["on"], strict=True))
    print(f"answers identical with the cache on and off: {same}")
    for mode in ("burst", "one at a time"):
        (ttft_off, wall_off), (ttft_on, wall_on) = (
            min(results[(mode, name)], key=lambda r: r[1]) for name in settings
        )
        print(f"{mode:>13}: median TTFT {ttft_off * 1e3:7.0f} -> {ttft_on * 1e3:6.0f} ms "
              f"({ttft_off / ttft_on:.1f}x); total {wall_off:6.2f} -> {wall_on:5.2f} s "
              f"({wall_off / wall_on:.1f}x)  [best of {args.rounds} by total]")  # fmt: skip


if __name__ == "__main__":
    main()
