"""Error analysis: the worst examples of each task, with what the model did.

A metric says how often a model fails; the examples say how. For every task type one rule picks
the failures and orders them worst first: the documents with the highest loss, the generations
with the lowest ROUGE-L, the misclassified examples and wrong multiple-choice answers the model
was most confident about (most negative margin = log p(gold) - best other log p), the sentences
with the most mistagged words, the programs that passed the fewest of their tests (code). The
rows go to errors.jsonl and into the report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_TEXT = 1000  # characters of each text field kept, so errors.jsonl stays readable


@dataclass(frozen=True)
class WorstRule:
    """Which records are failures, how to order them (ascending = worst first) and why."""

    is_failure: Callable[[dict[str, Any]], bool]
    sort_key: Callable[[dict[str, Any]], float]
    score_field: str
    reason: str


WORST: dict[str, WorstRule] = {
    "perplexity": WorstRule(
        lambda r: True, lambda r: -r["nll_per_token"], "nll_per_token", "highest loss per token"
    ),
    "generation": WorstRule(lambda r: True, lambda r: r["rougeL"], "rougeL", "lowest ROUGE-L"),
    "classification": WorstRule(
        lambda r: r["predicted"] != r["label"], lambda r: r["margin"], "margin", "wrong class"
    ),
    "multiple_choice": WorstRule(
        lambda r: r["predicted"] != r["gold"], lambda r: r["margin"], "margin", "wrong choice"
    ),
    "counterfactual": WorstRule(
        lambda r: True, lambda r: -abs(r["gap"]), "gap", "largest counterfactual gap"
    ),
    "tagging": WorstRule(
        lambda r: r["errors"] > 0, lambda r: -r["errors"], "errors", "most mistagged words"
    ),
    "code": WorstRule(
        lambda r: r["status"] != "passed",
        lambda r: r["tests_passed"] / max(r["tests_total"], 1),
        "tests_passed",
        "program did not pass its tests",
    ),
}


def _clip(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_TEXT:
        return value[:MAX_TEXT] + "…"
    return value


def worst_examples(
    task_type: str, records: list[dict[str, Any]], k: int = 5, **tags: Any
) -> list[dict[str, Any]]:
    """The k worst records of a task, worst first, tagged (model=..., task=...) for errors.jsonl."""
    rule = WORST.get(task_type)
    if rule is None:
        raise KeyError(f"no error rule for task type '{task_type}' (known: {', '.join(WORST)})")
    failures = sorted((r for r in records if rule.is_failure(r)), key=rule.sort_key)
    return [
        {
            **tags,
            "type": task_type,
            "rank": rank,
            "reason": rule.reason,
            "score": record[rule.score_field],
            **{key: _clip(value) for key, value in record.items()},
        }
        for rank, record in enumerate(failures[:k], start=1)
    ]
