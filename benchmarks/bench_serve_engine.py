"""The serving engine's continuous batching: 16 concurrent requests against one at a time.

A server's throughput comes from decoding many requests in one forward pass. This benchmark
times the same requests three ways, in one process, on the same model:

- **engine, concurrent**: all requests submitted at once to a running Engine (continuous batching:
  they are prefilled together and decode as one batch, leaving as they finish).
- **engine, one at a time**: the same Engine, each request submitted after the previous finished
  (what the engine costs when there is nothing to batch: its per-step overhead shows here).
- **generate, one at a time**: lmforge.model.generate on each prompt alone (no engine at all).

The model (the `small` preset's body with a 4k vocabulary, about 11M parameters) has random
weights; every request sets ignore_eos=True and is greedy, so each decodes exactly max_tokens
tokens and the three do identical work. The script also checks that every request's tokens are
the same in all three runs. Requests have different prompt lengths and max_tokens, so rows leave
the batch at different steps.

On a CPU shared with other work, `--threads 1` avoids torch's parallel ops stalling on a
descheduled thread (the batched steps suffer most, see lmforge.common.threads).

Run: `.venv/bin/python benchmarks/bench_serve_engine.py` (`--quick` for a smoke run)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from _rates import print_rates, time_round_robin


def make_tokenizer(vocab_size: int, out: Path):
    """A byte-level BPE TokenizerFiles trained on random words (only decoding speed matters)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lmforge.tokenizer.files import TokenizerFiles

    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyzéü"))
    words = ["".join(rng.choice(letters, int(rng.integers(2, 9)))) for _ in range(20_000)]
    corpus = [" ".join(words[i : i + 50]) for i in range(0, len(words), 50)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(out / "tokenizer.json"))
    return TokenizerFiles.load(out)


def small_engine(max_batch_size: int):
    """An Engine (not started) over the `small` preset's body, random weights (seed 0), and a
    4k-token tokenizer trained here."""
    from lmforge.model.config import preset_config
    from lmforge.model.transformer import Transformer
    from lmforge.serve.engine import Engine

    with tempfile.TemporaryDirectory() as tmp:
        files = make_tokenizer(4096, Path(tmp))
    torch.manual_seed(0)
    cfg = preset_config("small", vocab_size=files.vocab_size, block_size=512)
    return Engine(Transformer(cfg).eval(), files, name="bench", max_batch_size=max_batch_size)


def make_requests(n: int, vocab: int, args: argparse.Namespace) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(1)
    return [
        (
            rng.integers(1, vocab, int(rng.integers(args.min_len, args.max_len + 1))).tolist(),
            int(rng.integers(args.new_tokens // 2, args.new_tokens + 1)),
        )
        for _ in range(n)
    ]


LATENCY: dict[str, list] = {}  # contender -> the last round's handles, for TTFT and ITL


def engine_concurrent(engine, requests) -> list[list[int]]:
    from lmforge.serve.engine import SamplingParams, collect

    handles = [
        engine.submit(ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), f"c{i}")
        for i, (ids, n) in enumerate(requests)
    ]
    LATENCY["engine, concurrent"] = handles
    return [collect(h).token_ids for h in handles]


def engine_sequential(engine, requests) -> list[list[int]]:
    from lmforge.serve.engine import SamplingParams, collect

    out, handles = [], []
    for i, (ids, n) in enumerate(requests):
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        handles.append(engine.submit(ids, params, f"s{i}"))
        out.append(collect(handles[-1]).token_ids)
    LATENCY["engine, one at a time"] = handles
    return out


def latency_ms(handles) -> tuple[float, float]:
    """Median time to first token and median inter-token latency (ms) over the handles."""
    ttft = [h.first_token_at - h.submitted_at for h in handles]
    itl = [b - a for h in handles for a, b in zip(h.token_times, h.token_times[1:], strict=False)]
    return statistics.median(ttft) * 1e3, statistics.median(itl) * 1e3


def generate_sequential(model, requests) -> list[list[int]]:
    from lmforge.model.generate import generate

    with torch.inference_mode():
        return [
            generate(model, torch.tensor([ids]), n, greedy=True)[0, len(ids) :].tolist()
            for ids, n in requests
        ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=16, help="concurrent requests")
    ap.add_argument("--min-len", type=int, default=16, help="shortest prompt (tokens)")
    ap.add_argument("--max-len", type=int, default=96, help="longest prompt (tokens)")
    ap.add_argument("--new-tokens", type=int, default=64, help="most tokens per request")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = the engine's)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: fewer tokens, one round")
    args = ap.parse_args()
    if args.quick:
        args.new_tokens, args.rounds, args.max_len = 16, 1, 32

    engine = small_engine(args.requests)
    model, cfg = engine.model, engine.model.config
    if args.threads:  # after Engine(), which sizes the pool to the usable CPUs
        torch.set_num_threads(args.threads)
    engine.start()
    requests = make_requests(args.requests, cfg.vocab_size, args)
    n_new = sum(n for _, n in requests)
    print(f"model small body ({model.num_params() / 1e6:.1f}M params, vocab {cfg.vocab_size}), "
          f"{args.requests} requests, prompts {args.min_len}-{args.max_len} tokens, "
          f"{args.new_tokens // 2}-{args.new_tokens} new tokens each ({n_new} in all), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")  # fmt: skip

    contenders = {
        "engine, concurrent": lambda: engine_concurrent(engine, requests),
        "engine, one at a time": lambda: engine_sequential(engine, requests),
        "generate, one at a time": lambda: generate_sequential(model, requests),
    }
    times, outputs = time_round_robin(contenders, args.rounds)
    stats = engine.stats()
    engine.shutdown()

    conc, one, alone = contenders
    print_rates(times, n_new, [(conc, one), (conc, alone), (one, alone)])
    ref = outputs["generate, one at a time"]
    for name in ("engine, concurrent", "engine, one at a time"):
        same = sum(a == b for a, b in zip(outputs[name], ref, strict=True))
        print(f"{name}: {same}/{len(ref)} requests equal to generate alone token for token")
    print(f"engine (warm-up round too): {stats.steps} decoding steps, {stats.prefills} prefills")
    for name, handles in LATENCY.items():
        ttft, itl = latency_ms(handles)
        print(f"{name}: median time to first token {ttft:.0f} ms, inter-token {itl:.1f} ms")


if __name__ == "__main__":
    main()
