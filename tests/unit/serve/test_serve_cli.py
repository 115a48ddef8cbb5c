"""`lmforge serve` flags: help with an example, one-line errors before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[3] / "src"


def lmforge(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [sys.executable, "-m", "lmforge.cli", *args], capture_output=True, text=True, env=env
    )


def test_help_has_an_example_and_every_flag():
    out = lmforge("serve", "--help").stdout
    assert "Example: lmforge serve --model" in out
    for flag in ("--model", "--api-key", "--workers", "--kb", "--safety", "--feedback-db",
                 "--max-batch-size", "--max-queue", "--request-timeout", "bench"):  # fmt: skip
        assert flag in out, flag


def test_bad_flags_are_one_line_errors(tmp_path):
    r = lmforge("serve")
    assert r.returncode == 2 and "needs --model" in r.stderr + r.stdout
    r = lmforge("serve", "--model", str(tmp_path / "missing"))
    assert r.returncode == 2 and "is not a directory" in r.stderr + r.stdout
    (tmp_path / "a").mkdir()
    r = lmforge("serve", "--model", f"x={tmp_path / 'a'}", "--model", f"x={tmp_path / 'a'}")
    assert r.returncode == 2 and "used twice" in r.stderr + r.stdout
