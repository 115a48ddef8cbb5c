"""Text and classification metrics, each the field's reference definition.

BLEU is sacrebleu's corpus BLEU (its signature is returned so a number can be reproduced), ROUGE
is Google's rouge-score (F-measure, Porter stemmer), exact match compares whitespace-normalised
strings. Classification metrics are computed from the confusion matrix with numpy (tests check
them against scikit-learn): accuracy, per-class precision/recall/F1, and their macro and micro
averages, with 0 where a ratio has an empty denominator (scikit-learn's zero_division=0).
Tagging (finetune --task tag, the eval stage's tagging task): word accuracy and, for BIO (IOB2)
tags, seqeval-style entity precision / recall / F1, an entity counting only when its type and
exact span match, overall (micro) and per entity type.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.common.plots import pyplot

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"{module} is needed for this metric: pip install 'lmforge[eval]'"
        ) from None


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Corpus BLEU (0-100) over one reference per hypothesis, with sacrebleu's signature."""
    sacrebleu = _require("sacrebleu")
    metric = sacrebleu.metrics.BLEU()
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return {"bleu": float(score.score), "bleu_signature": str(metric.get_signature())}


def sentence_bleu(hypothesis: str, reference: str) -> float:
    """Smoothed sentence BLEU (sacrebleu's default 'exp' smoothing), for ranking examples."""
    sacrebleu = _require("sacrebleu")
    metric = sacrebleu.metrics.BLEU(effective_order=True)
    return float(metric.sentence_score(hypothesis, [reference]).score)


def rouge_scores(hypotheses: Sequence[str], references: Sequence[str]) -> list[dict[str, float]]:
    """Per-example ROUGE-1/2/L F-measures."""
    rouge_scorer = _require("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    return [
        {name: float(s.fmeasure) for name, s in scorer.score(ref, hyp).items()}
        for hyp, ref in zip(hypotheses, references, strict=True)
    ]


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure over examples (rouge-score's usual corpus aggregate)."""
    per = rouge_scores(hypotheses, references)
    return {name: float(np.mean([p[name] for p in per])) if per else 0.0 for name in ROUGE_TYPES}


def normalize(text: str) -> str:
    """Whitespace-collapsed, stripped text: what exact match compares."""
    return " ".join(text.split())


def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of hypotheses equal to their reference after normalize()."""
    pairs = list(zip(hypotheses, references, strict=True))
    return float(np.mean([normalize(h) == normalize(r) for h, r in pairs])) if pairs else 0.0


def confusion_matrix(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]
) -> np.ndarray:
    """counts[i, j] = examples of class labels[i] predicted as labels[j]."""
    index = {label: i for i, label in enumerate(labels)}
    cm = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(y_true, y_pred, strict=True):
        cm[index[t], index[p]] += 1
    return cm


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def classification_metrics(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro and micro precision/recall/F1, and per-class numbers with support."""
    cm = confusion_matrix(y_true, y_pred, labels).astype(np.float64)
    tp = np.diag(cm)
    predicted, actual = cm.sum(axis=0), cm.sum(axis=1)
    precision, recall = _safe_div(tp, predicted), _safe_div(tp, actual)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    micro_p = float(_safe_div(tp.sum(keepdims=True), predicted.sum(keepdims=True))[0])
    micro_r = float(_safe_div(tp.sum(keepdims=True), actual.sum(keepdims=True))[0])
    micro_f1 = 2 * micro_p * micro_r / (micro_p + micro_r) if micro_p + micro_r else 0.0
    return {
        "accuracy": float(tp.sum() / cm.sum()) if cm.sum() else 0.0,
        "precision_macro": float(precision.mean()) if len(labels) else 0.0,
        "recall_macro": float(recall.mean()) if len(labels) else 0.0,
        "f1_macro": float(f1.mean()) if len(labels) else 0.0,
        "precision_micro": micro_p,
        "recall_micro": micro_r,
        "f1_micro": micro_f1,
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(actual[i]),
            }
            for i, label in enumerate(labels)
        },
    }


def entity_spans(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) of the BIO (IOB2) entities in a tag sequence; an I- without a matching
    open entity starts one (seqeval's lenient default)."""
    spans, kind, start = set(), None, 0
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, name = tag.partition("-")
        continues = prefix == "I" and name == kind
        if kind is not None and not continues:
            spans.add((kind, start, i))
            kind = None
        if prefix in ("B", "I") and name and not continues:
            kind, start = name, i
    return spans


def is_bio(labels: Sequence[str]) -> bool:
    """Whether the tag set is BIO: 'O' and B-/I- prefixed names only."""
    return all(t == "O" or (t[:2] in ("B-", "I-") and len(t) > 2) for t in labels)


def _prf(tp: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
    precision, recall = tp / max(1, n_pred), tp / max(1, n_gold)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def entity_counts(
    gold: list[list[int]], pred: list[list[int]], labels: Sequence[str]
) -> dict[str, list[int]]:
    """Per entity type: [true positives, predicted, gold] entity counts over all sentences."""
    counts: dict[str, list[int]] = {}
    for g, p in zip(gold, pred, strict=True):
        g_spans = entity_spans([labels[i] for i in g])
        p_spans = entity_spans([labels[i] for i in p])
        for k, spans in ((0, g_spans & p_spans), (1, p_spans), (2, g_spans)):
            for kind, _, _ in spans:
                counts.setdefault(kind, [0, 0, 0])[k] += 1
    return counts


def tag_metrics(
    gold: list[list[int]], pred: list[list[int]], labels: list[str]
) -> dict[str, float]:
    """Word accuracy; with BIO tags also entity precision / recall / F1 (micro, exact spans)."""
    flat_gold = [t for row in gold for t in row]
    flat_pred = [t for row in pred for t in row]
    correct = sum(g == p for g, p in zip(flat_gold, flat_pred, strict=True))
    out = {"token_accuracy": round(correct / max(1, len(flat_gold)), 4)}
    if not is_bio(labels):
        return out
    tp, n_pred, n_gold = (sum(c[k] for c in entity_counts(gold, pred, labels).values())
                          for k in range(3))  # fmt: skip
    precision, recall, f1 = _prf(tp, n_pred, n_gold)
    out.update(entity_precision=round(precision, 4), entity_recall=round(recall, 4),
               entity_f1=round(f1, 4))  # fmt: skip
    return out


def entity_table(
    gold: list[list[int]], pred: list[list[int]], labels: list[str]
) -> dict[str, dict[str, float]]:
    """Per entity type precision / recall / F1 and support (gold entities), seqeval's report."""
    table = {}
    for kind, (tp, n_pred, n_gold) in sorted(entity_counts(gold, pred, labels).items()):
        p, r, f = _prf(tp, n_pred, n_gold)
        table[kind] = {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f, 4),
                       "support": n_gold}  # fmt: skip
    return table


def plot_confusion(cm: np.ndarray, labels: Sequence[str], path: Path, title: str = "") -> Path:
    """A confusion-matrix heatmap with counts in the cells (rows: true, columns: predicted)."""
    plt = pyplot()
    size = max(3.0, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), [str(x) for x in labels], rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), [str(x) for x in labels])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    limit = cm.max() / 2 if cm.size else 0
    for (i, j), count in np.ndenumerate(cm):
        ax.text(
            j, i, str(count), ha="center", va="center", color="white" if count > limit else "black"
        )
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
