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
and off.

- **multi-turn**: --chats two-turn chats. Turn 1 of every chat at once (a --chat-system-token
  system prompt + a question, --answer-tokens greedy tokens); then each turn 2 (turn 1's prompt +
  its answer + a new question) alone, timed to its first token, with the cache off, on but
  keeping prompts only (the answers' blocks not stored: the cache before answers were kept), and
  on. The model is the `small` preset's body (block_size 1024) with random weights and a 4k
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


def chats(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    """Turn-1 prompts of the multi-turn case: one system prompt, a question of each chat's own."""
    rng = np.random.default_rng(1)
    system = rng.integers(1, vocab, args.chat_system).tolist()
    return [system + rng.integers(1, vocab, int(rng.integers(16, 49))).tolist()
            for _ in range(args.chats)]  # fmt: skip


def second_turns(engine, firsts: list[list[int]], n_answer: int) -> tuple[list, list[float]]:
    """Runs every chat's turn 1 at once, then each turn 2 alone: (turn-2 answers, their TTFTs)."""
    from lmforge.serve.engine import SamplingParams, collect

    params = SamplingParams(max_tokens=n_answer, temperature=0, ignore_eos=True)
    handles = [engine.submit(p, params, f"t1-{i}") for i, p in enumerate(firsts)]
    answers = [collect(h).token_ids for h in handles]
    rng = np.random.default_rng(2)
    out, ttft = [], []
    for i, (prompt, answer) in enumerate(zip(firsts, answers, strict=True)):
        turn2 = [*prompt, *answer, *rng.integers(1, 4096, int(rng.integers(16, 49))).tolist()]
        handle = engine.submit(turn2, SamplingParams(max_tokens=4, temperature=0), f"t2-{i}")
        out.append(collect(handle).token_ids)
        ttft.append(handle.first_token_at - handle.submitted_at)
    return out, ttft


def multi_turn(args: argparse.Namespace, model, files) -> None:
    """The multi-turn case: turn-2 TTFT with the cache off, keeping prompts only, and on."""
    from lmforge.serve.engine import Engine

    firsts = chats(args, files.vocab_size)
    print(f"multi-turn: {args.chats} chats, turn 1 = {args.chat_system}-token system prompt + "
          f"16-48 own tokens -> {args.answer_tokens} answer tokens, turn 2 = that + answer + "
          "16-48 new tokens, each turn 2 alone")  # fmt: skip
    results: dict[str, list[float]] = {}
    answers: dict[str, list] = {}
    for _ in range(args.rounds):
        for name in ("off", "prompts only", "on"):
            mb = 0.0 if name == "off" else args.prefix_cache_mb
            engine = Engine(model, files, name="m", max_batch_size=args.chats, prefix_cache_mb=mb)
            if name == "prompts only":  # the answers' blocks are not stored when rows end
                engine._store_answers = lambda ending: None
            engine.start()
            out, ttft = second_turns(engine, firsts, args.answer_tokens)
            hit_tokens = engine.stats().prefix.hit_tokens
            engine.shutdown()
            results.setdefault(name, []).append(statistics.median(ttft))
            answers.setdefault(name, []).append(out)
            print(f"  {name:>12}: turn-2 median TTFT {ttft_ms(results[name][-1])}, "
                  f"{hit_tokens} prompt tokens reused (both turns)")  # fmt: skip
    same = all(answers[name] == answers["off"] for name in answers)
    print(f"turn-2 answers identical in all three settings: {same}")
    best = {name: min(r) for name, r in results.items()}
    print(f"   multi-turn: turn-2 median TTFT off {ttft_ms(best['off'])}, prompts only "
          f"{ttft_ms(best['prompts only'])}, on {ttft_ms(best['on'])} "
          f"({best['prompts only'] / best['on']:.1f}x vs prompts only)  "
          f"[best of {args.rounds}]")  # fmt: skip


def ttft_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--system", type=int, default=768, help="shared system prompt (tokens)")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens per answer")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prefix-cache-mb", type=float, default=256, help="the 'on' setting")
    ap.add_argument("--chats", type=int, default=8, help="multi-turn: chats")
    ap.add_argument("--chat-system", type=int, default=256, help="multi-turn: system prompt")
    ap.add_argument("--answer-tokens", type=int, default=256, help="multi-turn: turn-1 answer")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 4 requests, 1 round")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.rounds, args.system = 4, 1, 128
        args.chats, args.chat_system, args.answer_tokens = 2, 64, 48
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
    multi_turn(args, model, files)


if __name__ == "__main__":
    main()
