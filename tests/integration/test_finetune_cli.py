"""`lmforge finetune` and a tasks -> finetune recipe, in real processes on a micro model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from unit.finetune.helpers import make_model_dir, make_tokenizer_dir

from lmforge.artifacts import read_manifest

FAST = [
    "--set", "train.max_steps=3", "--set", "train.seq_len=64", "--set", "train.micro_batch_size=2",
    "--set", "train.warmup_steps=1", "--set", "train.eval_steps=1", "--set", "eval.rouge_examples=1",
    "--set", "eval.max_new_tokens=4",
]  # fmt: skip


def lmforge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmforge.cli", *args],
        cwd=cwd, env={**os.environ, "COLUMNS": "200"}, capture_output=True, text=True,
    )  # fmt: skip


def test_finetune_command_lora_then_cached_then_bad_record(tmp_path):
    model = make_model_dir(tmp_path / "model", make_tokenizer_dir(tmp_path / "tok"))
    data = tmp_path / "chat.jsonl"
    rows = [{"prompt": f"say {w}", "completion": w} for w in ["alpha", "beta", "gamma"] * 8]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [
        "finetune",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        "ft",
        "--method",
        "lora",
    ]
    proc = lmforge(*args, *FAST, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    manifest = read_manifest(tmp_path / "ft")
    assert manifest["config"]["method"] == "lora" and manifest["metrics"]["steps"] == 3
    assert (tmp_path / "ft" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "ft" / "final" / "model.safetensors").is_file()
    again = lmforge(*args, *FAST, cwd=tmp_path)
    assert again.returncode == 0 and "cached" in again.stderr

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"question": "x"}) + "\n")
    proc = lmforge("finetune", "--model", str(model), "--data", str(bad), "--out", "ft2",
                   *FAST, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2
    assert "bad.jsonl line 2" in proc.stderr and "Traceback" not in proc.stderr


def test_recipe_builds_tasks_then_classifies(tmp_path):
    model = make_model_dir(tmp_path / "model", make_tokenizer_dir(tmp_path / "tok"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: ft\nstages:\n  tasks:\n    stage: tasks\n  clf:\n    stage: finetune\n"
        f"    model: {model}\n    data: '@tasks/classify_train.jsonl'\n"
        "    val_data: '@tasks/classify_val.jsonl'\n    task: classify\n"
    )
    proc = lmforge("run", str(recipe), "--out", "run", *FAST, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    metrics = read_manifest(tmp_path / "run" / "clf")["metrics"]
    assert {"accuracy", "macro_f1", "majority_macro_f1"} <= set(metrics)
    assert (tmp_path / "run" / "tasks" / "eval_set.jsonl").is_file()
