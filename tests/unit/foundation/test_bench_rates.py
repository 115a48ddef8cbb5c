"""benchmarks/_rates.py, the round-robin timer the generation benchmarks share."""

from __future__ import annotations

import importlib.util
from pathlib import Path

RATES = Path(__file__).resolve().parents[3] / "benchmarks" / "_rates.py"


def _rates():
    spec = importlib.util.spec_from_file_location("bench_rates", RATES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_round_robin_times_every_round_after_an_untimed_warm_up_call():
    calls: list[str] = []

    def contender(name: str):
        def run() -> list[list[int]]:
            calls.append(name)
            return [[calls.count(name)]]

        return run

    times, outputs = _rates().time_round_robin({"a": contender("a"), "b": contender("b")}, 3)
    assert calls == ["a", "b"] * 4  # the warm-up round, then 3 timed rounds in turn
    assert {name: len(ts) for name, ts in times.items()} == {"a": 3, "b": 3}  # warm-up untimed
    assert outputs == {"a": [[4]], "b": [[4]]}  # each contender's last output
