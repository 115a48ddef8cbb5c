"""`lmforge eval` end to end: two models, four task kinds, one comparison, cached on rerun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from unit.evals.helpers import CORPUS, make_model_dir, trained_model_dir, write_split

MC = [
    {"query": "def add(a, b):\n    return", "choices": ["a + b", "the lazy dog"], "gold": 0},
    {"query": "The quick brown fox jumps over the", "choices": ["lazy dog.", "a + b"], "gold": 0},
    {"query": "import os\nprint(", "choices": ["os.getcwd())", "immutable"], "gold": 0},
]


def lmforge(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lmforge.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    make_model_dir(root / "base" / "final")
    (root / "base" / "final").rename(root / "base_model")
    tuned = trained_model_dir(root / "tuned")
    data = root / "data"
    write_split(data, "train", CORPUS)
    write_split(data, "val", CORPUS[:4])
    gen = root / "explain.jsonl"
    gen.write_text(
        "".join(
            json.dumps({"prompt": t[: len(t) // 2], "reference": t[len(t) // 2 :]}) + "\n"
            for t in CORPUS[:4]
        )
    )
    cls = root / "kinds.jsonl"
    cls.write_text(
        "".join(
            json.dumps({"text": t, "label": "code" if "(" in t else "prose"}) + "\n" for t in CORPUS
        )
    )
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC))
    task = root / "python_facts.yaml"
    task.write_text("type: multiple_choice\ndata: mc.jsonl\ntarget_delimiter: ' '\n")
    return {"root": root, "base": root / "base_model", "tuned": tuned, "data": data,
            "tasks": f"{data},{gen},{cls},{task}"}  # fmt: skip


def test_eval_cli_compares_models_on_every_task(setup: dict[str, Path]) -> None:
    out = setup["root"] / "run" / "eval"
    res = lmforge(
        "eval", "--model", str(setup["base"]), "--model", str(setup["tuned"]),
        "--tasks", setup["tasks"], "--out", str(out), "--set", "generation.max_new_tokens=8",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr + res.stdout
    report = json.loads((out / "eval.json").read_text())
    assert [m["name"] for m in report["models"]] == ["base_model", "tuned"]
    assert [t["name"] for t in report["tasks"]] == ["data", "explain", "kinds", "python_facts"]
    for model in ("base_model", "tuned"):
        r = report["results"][model]
        assert {"perplexity", "bits_per_byte", "unigram_bits_per_byte"} <= set(r["data"])
        assert {"bleu", "bleu_signature", "rouge1", "rouge2", "rougeL", "exact_match"} <= set(
            r["explain"]
        )
        assert r["explain"]["generation"]["max_new_tokens"] == 8
        assert {"accuracy", "f1_macro", "f1_micro", "per_class"} <= set(r["kinds"])
        assert {"acc", "acc_norm"} <= set(r["python_facts"])
    base, tuned = report["results"]["base_model"], report["results"]["tuned"]
    # the trained model is far below the unigram baseline, the untrained one above it
    assert tuned["data"]["bits_per_byte"] < 0.5 * tuned["data"]["unigram_bits_per_byte"]
    assert base["data"]["bits_per_byte"] > base["data"]["unigram_bits_per_byte"]
    assert tuned["python_facts"]["acc"] == 1.0
    assert tuned["explain"]["rougeL"] > base["explain"]["rougeL"]
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert {(e["model"], e["task"]) for e in errors} >= {
        ("base_model", "data"),
        ("tuned", "explain"),
    }
    gens = (out / "generations.jsonl").read_text().splitlines()
    assert len(gens) == 8
    assert (out / "plots" / "comparison.png").stat().st_size > 5000
    assert (out / "plots" / "confusion_tuned_kinds.png").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    stamp = (out / "eval.json").stat().st_mtime_ns
    assert manifest["metrics"]["tuned/python_facts/acc_norm"] == tuned["python_facts"]["acc_norm"]
    again = lmforge(
        "eval", "--model", str(setup["base"]), "--model", str(setup["tuned"]),
        "--tasks", setup["tasks"], "--out", str(out), "--set", "generation.max_new_tokens=8",
    )  # fmt: skip
    assert again.returncode == 0 and (out / "eval.json").stat().st_mtime_ns == stamp


def test_eval_cli_bad_task_is_one_line_exit_2(setup: dict[str, Path]) -> None:
    res = lmforge(
        "eval", "--model", str(setup["tuned"]), "--tasks", "nope.yaml",
        "--out", str(setup["root"] / "bad"),
    )  # fmt: skip
    assert res.returncode == 2
    assert "task nope.yaml: no such file or directory" in res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr
