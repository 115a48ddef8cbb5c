"""Our metrics agree with the reference libraries on shared inputs."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from lmforge.evals.metrics import (
    bleu,
    classification_metrics,
    confusion_matrix,
    entity_spans,
    entity_table,
    exact_match,
    plot_confusion,
    rouge,
    rouge_scores,
    sentence_bleu,
    tag_metrics,
)

HYPS = [
    "the cat sat on the mat",
    "returns the sum of two numbers",
    "opens a file and reads it",
    "completely unrelated words here",
]
REFS = [
    "the cat is sitting on the mat",
    "return the sum of a and b",
    "opens a file and reads it",
    "prints the current working directory",
]


def test_bleu_matches_sacrebleu_corpus_bleu() -> None:
    import sacrebleu

    got = bleu(HYPS, REFS)
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score, abs=1e-9)
    assert 0 < got["bleu"] < 100
    assert got["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert sentence_bleu(REFS[2], REFS[2]) == pytest.approx(100.0)


def test_rouge_matches_rouge_score_and_exact_match() -> None:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    expected = [scorer.score(r, h) for h, r in zip(HYPS, REFS, strict=True)]
    per = rouge_scores(HYPS, REFS)
    for got, want in zip(per, expected, strict=True):
        for key in ("rouge1", "rouge2", "rougeL"):
            assert got[key] == pytest.approx(want[key].fmeasure)
    means = rouge(HYPS, REFS)
    assert means["rougeL"] == pytest.approx(np.mean([e["rougeL"].fmeasure for e in expected]))
    assert per[2]["rouge1"] == 1.0 and per[3]["rouge2"] == 0.0
    assert exact_match(HYPS, REFS) == 0.25
    assert exact_match(["  a  b "], ["a b"]) == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_matches_scikit_learn(seed: int) -> None:
    from sklearn import metrics as sk

    rng = random.Random(seed)
    labels = ["func", "class", "const", "never"]  # 'never' is neither true nor predicted
    y_true = [rng.choice(labels[:3]) for _ in range(60)]
    y_pred = [t if rng.random() < 0.6 else rng.choice(labels[:3]) for t in y_true]
    got = classification_metrics(y_true, y_pred, labels)
    assert got["accuracy"] == pytest.approx(sk.accuracy_score(y_true, y_pred))
    for avg in ("macro", "micro"):
        p, r, f, _ = sk.precision_recall_fscore_support(
            y_true, y_pred, labels=labels, average=avg, zero_division=0
        )
        assert got[f"precision_{avg}"] == pytest.approx(p)
        assert got[f"recall_{avg}"] == pytest.approx(r)
        assert got[f"f1_{avg}"] == pytest.approx(f)
    p, r, f, s = sk.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    for i, label in enumerate(labels):
        row = got["per_class"][label]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((p[i], r[i], f[i]))
        assert row["support"] == s[i]
    np.testing.assert_array_equal(
        confusion_matrix(y_true, y_pred, labels), sk.confusion_matrix(y_true, y_pred, labels=labels)
    )


def test_confusion_plot_is_a_png(tmp_path: Path) -> None:
    cm = np.array([[3, 1], [0, 4]])
    out = plot_confusion(cm, ["a", "b"], tmp_path / "cm.png", title="toy")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 2000


def test_entity_metrics_are_seqeval_style():
    labels = ["B-LOC", "B-PER", "I-PER", "O"]
    gold = [[1, 2, 3, 0]]  # PER(0,2), LOC(3,4)
    assert tag_metrics(gold, gold, labels)["entity_f1"] == 1.0
    partial = tag_metrics(gold, [[1, 3, 3, 0]], labels)  # PER span cut short
    assert partial["entity_precision"] == 0.5 and partial["entity_recall"] == 0.5
    assert partial["token_accuracy"] == 0.75
    assert entity_spans(["I-X", "I-X", "O", "B-Y", "I-Z"]) == {
        ("X", 0, 2),
        ("Y", 3, 4),
        ("Z", 4, 5),
    }
    assert "entity_f1" not in tag_metrics([[0]], [[0]], ["NOUN"])  # not BIO: accuracy only
    table = entity_table(gold, [[1, 3, 3, 0]], labels)
    assert table == {"LOC": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1},
                     "PER": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}}  # fmt: skip


def test_the_tagging_headline_is_one_every_model_reports():
    from lmforge.evals.tasks import TASK_TYPES

    bio = tag_metrics([[0]], [[0]], ["B-X", "O"])
    plain = tag_metrics([[0]], [[0]], ["NOUN", "VERB"])
    tagging = TASK_TYPES["tagging"]
    assert tagging.headline_metric(bio, bio) == "entity_f1"
    assert tagging.headline_metric(bio, plain) == "token_accuracy" == tagging.headline_metric(plain)
