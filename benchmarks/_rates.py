"""Timing and the rate table the generation benchmarks share (bench_generate, bench_beam_search,
bench_speculative, bench_serve_engine, bench_quant_load).

Each contender is a no-argument function that produces every request's new tokens; all run in one
process, round-robin, so load on a shared machine falls on each alike, after one untimed warm-up
round, so that first-call costs (allocations, lazy imports, a library's set-up) fall outside the
times. The table reports new tokens per second at each contender's median wall time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

Tokens = list[list[int]]


def time_round_robin(
    contenders: dict[str, Callable[[], Tokens]], rounds: int
) -> tuple[dict[str, list[float]], dict[str, Tokens]]:
    """Each contender's wall times over rounds (one call per round, in turn, after an untimed
    warm-up call each) and last output."""
    for fn in contenders.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    outputs: dict[str, Tokens] = {}
    for _ in range(rounds):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return times, outputs


def print_rates(times: dict[str, list[float]], n_new: int, ratios: list[tuple[str, str]]) -> None:
    """The markdown table of new tokens/s and median wall per contender, then each ratio a / b."""
    print("\n| | new tokens/s (median) | wall (median) |\n|---|---:|---:|")
    rate = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rate[name] = n_new / med
        print(f"| {name} | {rate[name]:,.0f} | {med:.2f} s |")
    print()
    for a, b in ratios:
        print(f"{a} / {b}: {rate[a] / rate[b]:.2f}x")
