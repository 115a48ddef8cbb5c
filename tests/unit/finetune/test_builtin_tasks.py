"""Built-in stdlib tasks: module-disjoint splits, deterministic labels, files the finetune stage reads."""

import json
from pathlib import Path

from lmforge.finetune.builtin_tasks import (
    FAMILIES,
    TasksConfig,
    family_of,
    make_tasks,
    make_tasks_records,
    summary,
)
from lmforge.finetune.formats import read_file


def test_summary_takes_first_paragraph_and_cuts_at_a_sentence():
    doc = "Return the  absolute\nvalue of x.\n\nMore details here."
    assert summary(doc, 200) == "Return the absolute value of x."
    long = "First sentence is here and long enough. Second sentence goes on and on and on."
    assert summary(long, 50) == "First sentence is here and long enough."


def test_family_of():
    assert family_of("json") == "io"
    assert family_of("os.path") == "files"
    assert family_of("urllib.parse") == "net"
    assert family_of("tkinter") is None


def test_splits_are_module_disjoint_and_deterministic():
    cfg = TasksConfig(out="unused")
    a, b = make_tasks_records(cfg), make_tasks_records(cfg)
    assert a == b
    modules = {s: {r["category"] for r in a[f"explain_{s}"]} for s in ("train", "val", "test")}
    assert modules["train"] and modules["val"] and modules["test"]
    assert not (modules["train"] & modules["val"]) and not (modules["train"] & modules["test"])
    assert not (modules["val"] & modules["test"])
    labels = {r["label"] for r in a["classify_train"]}
    assert labels <= set(FAMILIES) and len(labels) >= 4
    other_seed = make_tasks_records(TasksConfig(out="unused", seed=1))
    assert other_seed["explain_val"] != a["explain_val"]


def test_stage_writes_readable_task_files_and_eval_set(tmp_path):
    out = make_tasks(TasksConfig(out=tmp_path / "tasks"))
    assert read_file(out / "explain_train.jsonl")[0] == "alpaca"
    assert read_file(out / "classify_val.jsonl")[0] == "classification"
    manifest = json.loads((out / "manifest.json").read_text())
    eval_lines = (out / "eval_set.jsonl").read_text().splitlines()
    m = manifest["metrics"]
    assert (
        len(eval_lines)
        == m["eval_set"]
        == sum(m[f"{t}_{s}"] for t in ("explain", "classify") for s in ("val", "test"))
    )
    val_text = json.loads((out / "explain_val.jsonl").read_text().splitlines()[0])["output"]
    assert any(val_text in json.loads(line)["text"] for line in eval_lines)


def test_held_out_answers_never_occur_in_train() -> None:
    from lmforge.finetune.builtin_tasks import TasksConfig, make_tasks_records

    records = make_tasks_records(TasksConfig(out="unused"))
    train_answers = {r["output"] for r in records["explain_train"]}
    train_texts = {r["text"] for r in records["classify_train"]}
    for split in ("val", "test"):
        assert records[f"explain_{split}"] and records[f"classify_{split}"]
        assert not train_answers & {r["output"] for r in records[f"explain_{split}"]}
        assert not train_texts & {r["text"] for r in records[f"classify_{split}"]}


def test_tasks_cache_depends_on_the_python_docs() -> None:
    import pydoc_data.topics

    from lmforge.finetune.builtin_tasks import TasksConfig

    assert TasksConfig(out="unused").inputs() == [Path(pydoc_data.topics.__file__)]
