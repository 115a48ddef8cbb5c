"""`lmforge finetune --task seq2seq` from scratch, then `lmforge generate` on its final/, in real
processes on a micro BART; a bad record is one line naming the file and line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from unit.finetune.helpers import make_tokenizer_dir

from lmforge.artifacts import read_manifest
from lmforge.evals.lm import EvalModel, GenerationSettings

FAST = [
    "--set", "train.max_steps=6", "--set", "train.seq_len=32", "--set", "train.micro_batch_size=4",
    "--set", "train.warmup_steps=1", "--set", "train.eval_steps=1", "--set", "eval.rouge_examples=2",
    "--set", "eval.max_new_tokens=6", "--set", "from_scratch=bart-micro",
]  # fmt: skip


def lmforge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmforge.cli", *args],
        cwd=cwd, env={**os.environ, "COLUMNS": "200"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_seq2seq_finetune_then_generate_then_bad_record(tmp_path):
    tok = make_tokenizer_dir(tmp_path / "tok")
    pairs = [{"input": f"say {w}", "output": w} for w in ["alpha", "beta", "gamma"] * 8]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    proc = lmforge("finetune", "--model", str(tok), "--data", str(data), "--out", "s2s",
                   "--task", "seq2seq", *FAST, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    metrics = read_manifest(tmp_path / "s2s")["metrics"]
    assert metrics["steps"] == 6 and {"rougeL", "bleu", "exact_match"} <= set(metrics)
    final = tmp_path / "s2s" / "final"
    assert json.loads((final / "config.json").read_text())["model_type"] == "bart"

    out = tmp_path / "answers.jsonl"
    proc = lmforge("generate", "--model", str(tmp_path / "s2s"), "-p", "say beta",
                   "--max-new-tokens", "5", "--out", str(out), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    expected = EvalModel.load(final).generate("say beta", GenerationSettings(max_new_tokens=5))
    assert row["completion"] == expected and row["completion"] in proc.stdout

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(pairs[0]) + "\n" + json.dumps({"input": "x"}) + "\n")
    proc = lmforge("finetune", "--model", str(tok), "--data", str(bad), "--out", "s2s-bad",
                   "--task", "seq2seq", *FAST, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2
    assert "bad.jsonl line 2" in proc.stderr and "Traceback" not in proc.stderr
