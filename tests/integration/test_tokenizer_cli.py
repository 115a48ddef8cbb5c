"""`lmforge tokenizer train` and `lmforge tokenizer encode` end to end in real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from lmforge.artifacts import read_manifest
from lmforge.common.io import write_jsonl

TEXTS = [
    "The tokenizer turns text into integers.",
    "Shards hold every document followed by an end-of-text token.",
    "Numbers like 2048 are split into digits; accents like café stay whole.",
]


def lmforge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmforge.cli", *args],
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200"},
        capture_output=True,
        text=True,
    )


def test_train_then_encode_then_cached(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl.zst", ({"text": t} for t in TEXTS * 20))
    write_jsonl(data / "val.jsonl.zst", ({"text": t} for t in TEXTS))
    train = ["tokenizer", "train", "--data", "data", "--out", "tok", "--vocab-size", "320"]
    proc = lmforge(*train, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    manifest = read_manifest(tmp_path / "tok")
    assert manifest["config"]["vocab_size"] == 320 and manifest["config"]["kind"] == "bpe"
    assert 0 < manifest["metrics"]["vocab_size"] <= 320
    assert manifest["metrics"]["unk_rate"] == 0

    proc = lmforge(
        "tokenizer", "encode", "--data", "data", "--tokenizer", "tok", "--out", "tokens",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "tokens" / "meta.json").read_text())
    assert meta["documents"] == {"train": 60, "val": 3}
    val = np.fromfile(tmp_path / "tokens" / "val.bin", dtype=meta["dtype"])
    assert val.size == meta["counts"]["val"] and int((val == meta["eos_id"]).sum()) == 3

    from transformers import AutoTokenizer  # the written directory loads as a HF tokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    first_doc = val[: int(np.argmax(val == meta["eos_id"]))].tolist()
    assert hf.encode(TEXTS[0]) == first_doc and hf.decode(first_doc) == TEXTS[0]

    again = lmforge(*train, cwd=tmp_path)
    assert again.returncode == 0 and read_manifest(tmp_path / "tok") == manifest  # cached


def test_missing_data_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = lmforge("tokenizer", "train", "--data", "nope", "--out", "tok", cwd=tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "lmforge data prepare" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    proc = lmforge("tokenizer", "train", "--data", "d", "--out", "t", "--kind", "spm", cwd=tmp_path)
    assert proc.returncode == 2 and "kind" in proc.stderr and "Traceback" not in proc.stderr
