"""Error analysis picks the real failures, worst first."""

from __future__ import annotations

import pytest

from lmforge.evals.errors import MAX_TEXT, worst_examples


def test_generation_lowest_rouge_first_with_tags() -> None:
    records = [
        {"index": i, "output": "x" * 2000, "rougeL": s} for i, s in enumerate([0.5, 0.1, 0.9, 0.3])
    ]
    rows = worst_examples("generation", records, k=2, model="base", task="explain")
    assert [r["index"] for r in rows] == [1, 3]
    assert rows[0]["model"] == "base" and rows[0]["rank"] == 1 and rows[0]["score"] == 0.1
    assert len(rows[0]["output"]) == MAX_TEXT + 1


def test_classification_only_wrong_most_confident_first() -> None:
    records = [
        {"label": "a", "predicted": "a", "margin": 2.0},
        {"label": "a", "predicted": "b", "margin": -0.1},
        {"label": "b", "predicted": "a", "margin": -3.0},
    ]
    rows = worst_examples("classification", records)
    assert [r["margin"] for r in rows] == [-3.0, -0.1]
    assert worst_examples("multiple_choice", [{"gold": 0, "predicted": 0, "margin": 1.0}]) == []


def test_perplexity_highest_loss_first_and_unknown_type() -> None:
    rows = worst_examples("perplexity", [{"nll_per_token": v} for v in (1.0, 4.0, 2.0)], k=5)
    assert [r["score"] for r in rows] == [4.0, 2.0, 1.0]
    with pytest.raises(KeyError, match="known: perplexity"):
        worst_examples("ranking", [])
