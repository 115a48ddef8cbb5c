"""The engine's scheduling policy without a model: admission under the token budget, chunking."""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace

from lmforge.serve.scheduler import admit, plan_prefill


def rows(*lengths: int) -> deque:
    return deque(SimpleNamespace(prompt=[1] * n, n=n) for n in lengths)


def test_admit_fills_free_rows_within_the_budget_and_takes_one_at_least():
    waiting = rows(5, 5, 5, 5)
    assert [r.n for r in admit(waiting, free=3, budget=12)] == [5, 5]  # a third is over budget
    assert len(waiting) == 2
    assert [r.n for r in admit(rows(5, 5, 5, 5), free=3, budget=99)] == [5, 5, 5]  # rows full
    waiting = rows(30, 2)
    assert [r.n for r in admit(waiting, free=4, budget=8)] == [30]  # alone, though over budget
    assert [r.n for r in admit(rows(4, 9), free=4, budget=8)] == [4]  # the next one waits
    assert admit(rows(4), free=0, budget=8) == []


def test_plan_prefill_chunks_the_groups_whose_pass_exceeds_the_budget():
    prompts = [[1] * 3, [1] * 20, [1] * 6, [1] * 6]  # groups: [20], [6, 6, 3 padded to 6]
    assert plan_prefill(prompts, budget=20) == ([[1], [2, 3, 0]], [])
    assert plan_prefill(prompts, budget=18) == ([[2, 3, 0]], [1])  # 20 alone, chunk by chunk
    assert plan_prefill(prompts, budget=17) == ([], [1, 2, 3, 0])  # the group's 18 is over
