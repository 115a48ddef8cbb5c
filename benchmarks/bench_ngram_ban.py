"""The no-repeat n-gram ban per decoding step: the per-row Python loop it replaced (loop) and
the first tensor version, which copied the logits (clone), against lmforge's in-place tensor
version (tensor: model.logits_rules.ban_repeated_ngrams_), on the same histories.

Each case is `--rows` histories of T tokens drawn from a vocabulary of `--ids` ids (32k: few
repeats, so few bans; 200, 20: more) and fresh (rows, V) logits per call, as a decoding step hands
over. Contenders run interleaved, one call each in turn, `--calls` times, so load on a shared
machine falls on each alike; the median per call is printed, and all three outputs are
checked equal first.

Run: `OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/bench_ngram_ban.py`
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmforge.model.logits_rules import NEG_INF, ban_repeated_ngrams_


def loop_ban(logits: torch.Tensor, history: torch.Tensor, lengths: list[int], n: int):
    """The ban before it was tensor ops (lmforge 93051b5^): a Python loop over rows and
    windows, then one index_put of the banned (row, token) pairs."""
    banned_rows, banned_cols = [], []
    for row, tokens in enumerate(history.tolist()):
        tokens = tokens[len(tokens) - lengths[row] :]
        if len(tokens) + 1 < n:
            continue
        prefix = tokens[len(tokens) - n + 1 :]
        for i in range(len(tokens) - n + 1):
            if tokens[i : i + n - 1] == prefix:
                banned_rows.append(row)
                banned_cols.append(tokens[i + n - 1])
    if not banned_rows:
        return logits
    dev = logits.device
    where = (torch.tensor(banned_rows, device=dev), torch.tensor(banned_cols, device=dev))
    return logits.index_put(where, torch.tensor(NEG_INF, dtype=logits.dtype, device=dev))


def clone_ban(logits: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor, n: int):
    """The first tensor version (lmforge 93051b5): a copy of the (B, V) logits, every window
    scattered at its own token (+inf, a no-op under amin, where it bans nothing)."""
    T = history.size(1)
    windows = history.unfold(1, n, 1)
    prefix = history[:, T - n + 1 :]
    matches = (windows[:, :, : n - 1] == prefix[:, None, :]).all(dim=-1)
    starts = torch.arange(windows.size(1), device=history.device)
    matches &= starts[None, :] >= (T - lengths)[:, None]
    bans = torch.where(matches, NEG_INF, float("inf")).to(logits.dtype)
    return logits.clone().scatter_reduce_(1, windows[:, :, n - 1], bans, reduce="amin")


def case(rows: int, T: int, ids: int, vocab: int, n: int, calls: int) -> dict[str, float]:
    """Median ms per call of each contender on one case (outputs checked equal first)."""
    g = torch.Generator().manual_seed(0)
    history = torch.randint(0, ids, (rows, T), generator=g)
    lengths = torch.full((rows,), T)
    base = torch.randn(rows, vocab, generator=g)
    want = loop_ban(base.clone(), history, lengths.tolist(), n)
    got = ban_repeated_ngrams_(base.clone(), history, lengths, n)
    assert torch.equal(want, got), "the bans differ"
    assert torch.equal(want, clone_ban(base.clone(), history, lengths, n)), "the bans differ"
    contenders = {
        "loop": lambda x: loop_ban(x, history, lengths.tolist(), n),
        "clone": lambda x: clone_ban(x, history, lengths, n),
        "tensor": lambda x: ban_repeated_ngrams_(x, history, lengths, n),
    }
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(calls):
        for name, fn in contenders.items():
            logits = base.clone()  # a fresh step's logits, not timed
            t0 = time.perf_counter()
            fn(logits)
            times[name].append((time.perf_counter() - t0) * 1e3)
    bans = int(torch.isinf(want).sum())
    return {"bans": bans, **{k: statistics.median(v) for k, v in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32000, help="logits width V")
    ap.add_argument("--n", type=int, default=3, help="no_repeat_ngram_size")
    ap.add_argument("--calls", type=int, default=30, help="calls per contender")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.rows} rows, V={args.vocab}, n={args.n}, median of {args.calls} calls (ms)")
    print(f"{'history':>8} {'ids':>6} {'bans':>6} {'loop':>8} {'clone':>8} {'tensor':>8}")
    for T, ids in ((600, 32000), (4096, 32000), (600, 200), (600, 20)):
        r = case(args.rows, T, ids, args.vocab, args.n, args.calls)
        print(
            f"{T:>8} {ids:>6} {r['bans']:>6} {r['loop']:>8.2f} {r['clone']:>8.2f} "
            f"{r['tensor']:>8.2f}"
        )


if __name__ == "__main__":
    main()
