"""Counterfactual bias evaluation: the same prompt with each side's demographic terms, scored.

Every example that mentions a term of a group (lmforge.data.terms) is rewritten twice, once
with all the group's terms on side 0 ("he", "man", ...) and once on side 1 ("she", "woman",
...); whole words, case kept. Both versions are scored by the model and the gap is
score(side 0) - score(side 1):

- a sequence classifier (a trained head): the probability of one class (the task's
  `target_label`, default the head's first label), so a gap of 0.4 means the class's
  probability moves by 0.4 when only the demographic words change;
- otherwise the model's likelihood per token of the whole text, in nats (evals.scoring): a causal
  LM's log-likelihood, an encoder's pseudo-log-likelihood (masked LM), an encoder-decoder's
  decoder log-likelihood given an empty source; `scoring` in the metrics says which.

Per group the task reports n, mean and std of the gap, the mean absolute gap and the worst
examples; the headline is the largest mean absolute gap over groups (lower is better). An
unbiased model scores 0 for every group.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.common.plots import pyplot
from lmforge.data.terms import TermGroup, load_groups
from lmforge.errors import InputError

ScoreFn = Callable[[list[str]], list[float]]
WORST_PER_GROUP = 3


def counterfactual_pairs(texts: list[str], groups: list[TermGroup]) -> list[dict[str, Any]]:
    """(example, group) pairs where the text mentions the group: its side-0 and side-1 texts."""
    pairs = []
    for i, text in enumerate(texts):
        for g in groups:
            side0, seen = g.rewrite(text, 0)
            if seen:
                pairs.append({"index": i, "group": g.name, "text": text, "text_a": side0,
                              "text_b": g.rewrite(text, 1)[0], "terms": seen})  # fmt: skip
    return pairs


def gap_report(
    texts: list[str], groups: list[TermGroup], score: ScoreFn
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics, records): per-group gap statistics and one record per scored pair."""
    pairs = counterfactual_pairs(texts, groups)
    if not pairs:
        names = ", ".join(g.name for g in groups)
        raise InputError(
            f"no example mentions a term of the bias groups ({names}); nothing to swap"
        )
    scores = score([p["text_a"] for p in pairs] + [p["text_b"] for p in pairs])
    n = len(pairs)
    for p, a, b in zip(pairs, scores[:n], scores[n:], strict=True):
        p.update(score_a=float(a), score_b=float(b), gap=float(a) - float(b))
    per_group: dict[str, Any] = {}
    for g in groups:
        rows = [p for p in pairs if p["group"] == g.name]
        gaps = np.asarray([p["gap"] for p in rows], dtype=float)
        worst = sorted(rows, key=lambda p: -abs(p["gap"]))[:WORST_PER_GROUP]
        per_group[g.name] = {
            "sides": list(g.sides),
            "n": len(rows),
            "mean_gap": round(float(gaps.mean()), 6) if len(rows) else None,
            "std_gap": round(float(gaps.std()), 6) if len(rows) else None,
            "mean_abs_gap": round(float(np.abs(gaps).mean()), 6) if len(rows) else None,
            "worst": [{k: p[k] for k in ("index", "text_a", "text_b", "gap")} for p in worst],
        }
    measured = {k: v for k, v in per_group.items() if v["n"]}
    worst_group = max(measured, key=lambda k: measured[k]["mean_abs_gap"])
    metrics = {
        "max_abs_gap": measured[worst_group]["mean_abs_gap"],
        "worst_group": worst_group,
        "n": n,
        **{f"{k}_mean_abs_gap": v["mean_abs_gap"] for k, v in measured.items()},
        "groups": per_group,
    }
    return metrics, pairs


def classifier_scores(model: Any, target: str) -> ScoreFn:
    """P(target class | text) from the model's classification head."""
    labels = model.head.labels
    if target not in labels:
        raise InputError(f"target_label '{target}' is not one of the head's labels {labels}")
    k = labels.index(target)
    return lambda texts: [float(np.exp(model.classify(t)[k])) for t in texts]


LIKELIHOOD_SCORING = {
    "causal": "log-likelihood per token",
    "pseudo_log_likelihood": "pseudo-log-likelihood per token",
    "conditional": "log-likelihood per token (decoder, empty source)",
}


def run_counterfactual(model: Any, spec: Any, _settings: Any) -> Any:
    """The `counterfactual` task type (see lmforge.evals.tasks)."""
    from lmforge.evals.task_format import TaskResult, load_examples

    rows = load_examples(spec)
    groups = load_groups(spec.terms, spec.groups)
    use_head = spec.classifier != "likelihood" and model.head is not None
    if spec.classifier == "head" and model.head is None:
        raise InputError(f"task '{spec.name}': classifier 'head' but {model.path} has no head")
    if use_head:
        target = spec.target_label or model.head.labels[0]
        score, scoring = classifier_scores(model, target), f"P({target})"
    else:
        score = model.scorer.mean_logprobs
        scoring = LIKELIHOOD_SCORING[model.scorer.scoring]
    metrics, records = gap_report([str(r["text"]) for r in rows], groups, score)
    metrics["scoring"] = scoring
    return TaskResult(metrics, records)


def plot_gaps(metrics: dict[str, Any], path: Path, title: str) -> Path:
    """Mean gap per group with its std as an error bar, and the mean absolute gap beside it."""
    plt = pyplot()
    groups = [g for g, v in metrics["groups"].items() if v["n"]]
    means = [metrics["groups"][g]["mean_gap"] for g in groups]
    stds = [metrics["groups"][g]["std_gap"] for g in groups]
    abs_ = [metrics["groups"][g]["mean_abs_gap"] for g in groups]
    x = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(1.6 * len(groups) + 3, 3.4))
    ax.bar(x - 0.2, means, 0.4, yerr=stds, capsize=3, label="mean gap (side 0 - side 1) ± std")
    ax.bar(x + 0.2, abs_, 0.4, label="mean |gap|")
    ax.axhline(0, color="black", linewidth=0.8)
    labels = [f"{g}\n{'/'.join(metrics['groups'][g]['sides'])}" for g in groups]
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel(metrics.get("scoring", "score") + " gap", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
