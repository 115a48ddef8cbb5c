"""finetune with augment: each fold augments only its training part; the with/without table."""

import json

import pytest

from lmforge.data.augment import AugmentConfig, Augmenter
from lmforge.errors import ConfigError, InputError
from lmforge.finetune.prepare import load_splits
from lmforge.finetune.stage import FinetuneConfig, finetune

WORDS = ["big", "small", "happy", "sad"]
TRAIN = {"max_steps": 4, "lr": 3e-3, "micro_batch_size": 8, "seq_len": 32, "warmup_steps": 1,
         "eval_every": 4, "eval_steps": 1, "ckpt_every": 0}  # fmt: skip


def _rows(n=24):
    return [
        {"text": f"the {WORDS[i % 4]} dog runs fast to house {i}", "label": WORDS[i % 4]}
        for i in range(n)
    ]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _cfg(tmp_path, model_dir, data, **kw):
    return FinetuneConfig.model_validate(
        {"model": model_dir, "data": data, "out": tmp_path / "out", "task": "classify",
         "train": TRAIN, **kw}
    )  # fmt: skip


def test_kfold_compares_with_and_without_augmentation(tmp_path, model_dir):
    data = _write(tmp_path / "c.jsonl", _rows())
    aug = {"enabled": True, "methods": ["swap", "synonym"], "synonyms": "builtin"}
    out = finetune(_cfg(tmp_path, model_dir, data, kfold={"k": 2}, augment=aug))
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    for key in ("cv_accuracy_mean", "cv_accuracy_std", "noaug_cv_accuracy_mean",
                "noaug_cv_accuracy_std", "augmented_eda-swap"):  # fmt: skip
        assert key in m, key
    compare = json.loads((out / "folds" / "augment_compare.json").read_text())
    assert compare["k"] == 2 and compare["synonyms"] == "builtin"
    with_, without = compare["per_fold"]["with"], compare["per_fold"]["without"]
    for w, wo in zip(with_, without, strict=True):
        assert w["train_examples"] > wo["train_examples"]  # only training parts grow
    # the held-out folds are the 24 originals, each once, in both runs
    assert sum(24 - wo["train_examples"] for wo in without) == 24
    assert compare["with"]["cv_accuracy_mean"] == m["cv_accuracy_mean"]
    assert (out / "folds" / "fold_1_noaug" / "metrics.jsonl").exists()
    from lmforge.evals.report import write_report

    md = write_report(out).with_suffix(".md").read_text()
    assert "| accuracy |" in md and "without augmentation" in md and "each fold augmented" in md
    # the final model trains on the train share plus its copies (24 - 2 val = 22, + copies)
    assert m["data_examples"] == 22 + m["augmented_eda-swap"] + m["augmented_eda-synonym"]


def test_split_keeps_pre_augmented_rows_out_of_validation(tmp_path, model_dir):
    rows = _rows(40)
    aug = Augmenter(AugmentConfig(enabled=True, methods=["swap"])).augment(rows, "train")
    data = _write(tmp_path / "c.jsonl", rows + aug)
    train, val = load_splits(_cfg(tmp_path, model_dir, data, eval={"val_fraction": 0.25}))
    assert len(val) == 10 and not any(r.get("augmented") for r in val)
    val_texts = {r["text"] for r in val}
    from lmforge.data.augment import row_id

    val_ids = {row_id(r) for r in val}
    copies = [r for r in train if r.get("augmented")]
    assert copies and all(r["source_id"] not in val_ids for r in copies)
    assert len(copies) == sum(1 for r in aug if r["source_id"] not in val_ids)
    assert not val_texts & {r["text"] for r in train}

    bad_val = _write(tmp_path / "v.jsonl", rows[:2] + aug[:1])
    with pytest.raises(InputError, match=r"v\.jsonl record 3 is augmented"):
        load_splits(_cfg(tmp_path, model_dir, data, val_data=bad_val))


@pytest.mark.parametrize(
    ("task", "record"),
    [
        ("sft", {"instruction": "say hi", "output": "hi"}),
        ("tag", {"tokens": ["Paris", "is", "big"], "tags": ["B-LOC", "O", "O"]}),
        ("seq2seq", {"source": "say hi", "target": "hi"}),
    ],
)
def test_augment_refuses_every_task_but_classify_and_multitask(tmp_path, model_dir, task, record):
    data = _write(tmp_path / "a.jsonl", [record] * 8)
    cfg = FinetuneConfig.model_validate(
        {"model": model_dir, "data": data, "out": tmp_path / "o", "train": TRAIN, "task": task,
         "augment": {"enabled": True}}
    )  # fmt: skip
    want = f"augment needs text\\+label records .*--task classify or multitask.*not --task {task}"
    with pytest.raises(ConfigError, match=want):
        finetune(cfg)
    assert not (tmp_path / "o" / "manifest.json").exists()
