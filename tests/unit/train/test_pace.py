"""The loop's clock: the log window's throughput restarts, the run's keeps counting."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lmforge.train import pace


def test_window_throughput_restarts_while_the_run_keeps_its_tokens(monkeypatch):
    clock = iter([102.0, 103.0, 105.0, 110.0])
    monkeypatch.setattr(pace, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    p = pace.Pace(first_step=4, window_t0=100.0, run_t0=100.0)
    p.count(500)
    assert p.window_tokens_per_s() == pytest.approx(500 / 2)  # read at 102
    p.restart_window()  # at 103
    p.count(300)
    assert p.window_tokens_per_s() == pytest.approx(300 / 2)  # read at 105
    assert (p.window_tokens, p.run_tokens, p.first_step) == (300, 800, 4)
    assert p.run_tokens_per_s() == pytest.approx(800 / 10)  # read at 110, from 100


def test_window_throughput_of_an_instant_is_finite(monkeypatch):
    monkeypatch.setattr(pace, "time", SimpleNamespace(perf_counter=lambda: 7.0))
    p = pace.Pace(first_step=0, window_t0=7.0, run_t0=7.0)
    p.count(10)
    assert p.window_tokens_per_s() == pytest.approx(10 / 1e-9)
