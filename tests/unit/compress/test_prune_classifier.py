"""compress prune of sequence classifiers (a decoder's last-token head, an encoder's mean-pooled
one): recovery trains the classification loss on labelled examples through the one loop, the
head trained with the body, and compression.json / the manifest / the report say the accuracy of
the original, the pruned and the recovered model, which eval then reproduces from final/."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.compress.prune import sparsity_of
from lmforge.compress.stage import CompressConfig, compress
from lmforge.errors import ConfigError, InputError
from lmforge.evals.lm import EvalModel
from lmforge.finetune.heads import SEQ_LEN_KEY
from lmforge.finetune.stage import FinetuneConfig, finetune
from lmforge.model.convert import MEAN_HEAD, load_classifier, load_pretrained

WORDS = ["alpha", "beta", "gamma", "delta", "one", "two", "three", "four"]
TUNE = {"max_steps": 30, "lr": 3e-3, "micro_batch_size": 8, "seq_len": 16, "warmup_steps": 2,
        "eval_every": 0, "eval_steps": 1, "ckpt_every": 0}  # fmt: skip
RECOVER = {"max_steps": 30, "lr": 3e-3, "micro_batch_size": 8, "seq_len": 16, "warmup_steps": 2,
           "eval_every": 0, "eval_steps": 1, "ckpt_every": 0}  # fmt: skip


def _rows(n: int, shift: int) -> list[dict[str, str]]:
    # separable: the label is the first word (alpha or beta); the rest is noise, each draw of it
    # given to both labels (rows 2k and 2k + 1), so only the first word tells them apart
    noise = lambda i: " ".join(WORDS[2 + (i // 2 * 5 + j * (j + shift)) % 6] for j in range(3))  # noqa: E731
    return [{"text": f"{WORDS[i % 2]} {noise(i)}", "label": WORDS[i % 2]} for i in range(n)]


def _write(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=[("micro", "first"), ("bert-micro", "mean")])
def classifier(request, tmp_path_factory):
    """(finetune stage dir of a classifier fitted to the toy set, train file, val file)."""
    from unit.finetune.encoder_tokenizers import bert_tokenizer_dir
    from unit.finetune.helpers import make_model_dir, make_tokenizer_dir

    preset, pooling = request.param
    root = tmp_path_factory.mktemp(preset)
    tok = (bert_tokenizer_dir if preset == "bert-micro" else make_tokenizer_dir)(root / "tok")
    base = make_model_dir(root / "base", tok, preset=preset)
    train, val = (
        _write(root / "train.jsonl", _rows(48, 0)),
        _write(root / "val.jsonl", _rows(16, 1)),
    )
    values = {"model": base, "data": train, "val_data": val, "out": root / "cls",
              "task": "classify", "pooling": pooling, "train": TUNE}  # fmt: skip
    return finetune(FinetuneConfig.model_validate(values)), train, val


def test_recovery_trains_the_classification_loss_and_reports_accuracy(classifier, tmp_path):
    from lmforge.evals.report import write_report

    src, train, val = classifier
    tuned = json.loads((src / "manifest.json").read_text())["metrics"]
    values = {"method": "prune", "model": src, "examples": train, "val_examples": val,
              "prune": {"kind": "magnitude", "sparsity": 0.95}, "train": RECOVER,
              "out": tmp_path / "p"}  # fmt: skip
    out = compress(CompressConfig.model_validate(values))
    report = json.loads((out / "compression.json").read_text())
    # the original scores as finetune's val metrics said; pruning hurts; recovery gets it back
    assert report["accuracy_original"] == pytest.approx(tuned["accuracy"], abs=1e-4)
    cls = report["classification"]
    assert cls["val_rows"] == 16 and cls["seq_len"] == TUNE["seq_len"]
    assert report["recovery"]["steps"] == RECOVER["max_steps"]
    assert cls["val_loss_recovered"] < cls["val_loss_pruned"]
    assert report["accuracy_recovered"] > report["accuracy_pruned"]
    assert report["accuracy_recovered"] >= 0.75  # measured: 0.8125 (decoder), 1.0 (encoder)
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    for key in ("accuracy_original", "accuracy_pruned", "accuracy_recovered"):
        assert metrics[key] == report[key]
    # final/: the zeros kept, the head the recovery trained, eval's accuracy the recovered one
    final = out / "final"
    assert sparsity_of(load_pretrained(final)) >= 0.94
    assert not np.allclose(load_classifier(final).weight, load_classifier(src / "final").weight)
    assert json.loads((final / "config.json").read_text())[SEQ_LEN_KEY] == TUNE["seq_len"]
    tokenizer_config = json.loads((final / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == TUNE["seq_len"]  # transformers cuts there too
    model = EvalModel.load(final)
    assert (final / MEAN_HEAD).is_file() == (model.head.reads == "mean_tokens")
    rows = [json.loads(line) for line in val.read_text().splitlines()]
    hits = [
        model.head.labels[int(np.argmax(model.classify(r["text"])))] == r["label"] for r in rows
    ]
    assert np.mean(hits) == pytest.approx(report["accuracy_recovered"], abs=1e-6)
    page = write_report(tmp_path).read_text()
    assert "<th>accuracy</th>" in page
    original = f"(original {report['accuracy_original']:.3f})"
    for key in ("accuracy_pruned", "accuracy_recovered"):
        assert f"accuracy {report[key]:.3f} {original}" in page
    assert "Accuracy on 16 rows of val.jsonl." in page  # held out: no training-rows warning


def test_the_report_says_when_accuracy_is_on_the_recovery_training_rows():
    from lmforge.evals.report_sections.compress import _accuracy_rows

    cls = {"examples": "/d/train.jsonl", "val_examples": "/d/train.jsonl", "val_rows": 48}
    assert _accuracy_rows({"classification": cls}) == (
        " Accuracy on 48 rows of train.jsonl, the examples the recovery trained on (no held-out "
        "val_examples given)."
    )
    held_out = {"classification": cls | {"val_examples": "/d/val.jsonl", "val_rows": 16}}
    assert _accuracy_rows(held_out) == " Accuracy on 16 rows of val.jsonl."
    assert _accuracy_rows({"method": "prune"}) == ""  # no classifier, no sentence


def test_examples_are_refused_where_they_train_nothing(classifier, tmp_path):
    src, train, val = classifier
    with pytest.raises(
        ConfigError, match=r"is a classifier: prune's recovery on tokens .*examples"
    ):
        compress(CompressConfig(method="prune", model=src, tokens=tmp_path, out=tmp_path / "t"))
    with pytest.raises(ConfigError, match="examples train a sequence classifier's prune recovery"):
        compress(CompressConfig(method="quantize", model=src, examples=train, out=tmp_path / "q"))
    other = _write(tmp_path / "other.jsonl", [{"text": "gamma one", "label": "gamma"}] * 8)
    with pytest.raises(InputError, match=r"other\.jsonl: labels \['gamma'\] are not the classif"):
        compress(CompressConfig(method="prune", model=src, examples=other, out=tmp_path / "o"))
    assert not (tmp_path / "o" / "manifest.json").exists()
    with pytest.raises(ConfigError, match=r"val_examples=.*val\.jsonl score .* examples is unset"):
        compress(CompressConfig(method="prune", model=src, val_examples=val, out=tmp_path / "v"))
