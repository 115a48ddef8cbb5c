"""Run an lmforge model's GGUF in llama.cpp (benchmarks/check_gguf_llamacpp.py) and check that it
computes what lmforge does; the integration tests of the GGUF exports share it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from lmforge.model.convert import save_pretrained

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "check_gguf_llamacpp.py"


def assert_llama_cpp_runs_like_lmforge(model: nn.Module, trained_dir: Path, out: Path) -> Path:
    """Save model under out/m with trained_dir's tokenizer and special ids, run its f32 GGUF in
    llama.cpp: logits within 1e-3 of lmforge's and every greedy token equal. Skips without
    llama-cpp-python; returns the saved model directory."""
    pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (lmforge[gguf-check])"
    )
    config = json.loads((trained_dir / "config.json").read_text())
    ids = {k: v for k, v in config.items() if k in ("bos_token_id", "eos_token_id")}
    save_pretrained(model, out / "m", extra_config=ids)
    shutil.copy(trained_dir / "tokenizer.json", out / "m" / "tokenizer.json")
    args = [str(out / "m"), "--types", "f32", "--new-tokens", "12", "--out", str(out / "c.json")]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = json.loads((out / "c.json").read_text())["results"]
    assert result["max_abs_logit_diff"] < 1e-3
    agreed = [tuple(a.split("/")) for a in result["greedy_agree"]]  # "tokens agreeing/generated"
    assert len(agreed) == 4 and all(n == of for n, of in agreed)
    return out / "m"
