"""benchmarks/bench_train_gpu.py's dry run: every contender but nanoGPT, a few steps, tiny shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_train_gpu.py"


def dry_run(tmp_path: Path, device: str) -> dict:
    out = tmp_path / "bench.json"
    args = ["--device", device, "--shape", "tiny", "--skip", "nanogpt", "--compile", "off",
            "--threads", "1", "--rounds", "1", "--warmup", "1", "--steps", "2", "--micro-batch-sweep", "4,8",
            "--out", str(out)]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| HF LlamaForCausalLM |" in proc.stdout  # the markdown table
    return json.loads(out.read_text())


@pytest.mark.integration
def test_cpu_dry_run_measures_every_contender_without_mfu(tmp_path: Path) -> None:
    report = dry_run(tmp_path, "cpu")
    results = report["results"]
    assert set(results) == {"hf-llama", "lmforge", "lmforge-llama"}
    for r in results.values():
        assert r["tokens_per_s"] > 0 and r["flops_per_token"] > 0
        assert r["mfu"] is None  # no peak FLOP/s on a CPU
    assert report["peak_flops"] is None
    assert set(report["ratios"]) == {"lmforge/hf-llama", "lmforge-llama/hf-llama"}
    sweep = {r["micro_batch"]: r for r in report["sweep"]}
    assert sweep[4]["from"] == "rounds" and sweep[8]["tokens_per_s"] > 0


@pytest.mark.gpu
def test_cuda_dry_run_reports_mfu_and_memory(tmp_path: Path) -> None:
    """The CUDA-only branches: pinned batches, synchronize, peak memory, the peak FLOP/s lookup."""
    from lmforge.train.pace import peak_flops

    report = dry_run(tmp_path, "cuda")
    known_gpu = peak_flops(report["device"]) is not None
    for r in report["results"].values():
        assert r["tokens_per_s"] > 0 and r["peak_mem_gib"] > 0
        assert (r["mfu"] is not None) == known_gpu
