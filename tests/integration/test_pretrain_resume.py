"""Exact resume: SIGKILL a real pretraining process at a random step, rerun, compare bitwise."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.torch import load_file

from .test_pretrain_stage import lmforge, make_shards

STEPS = 40
ARGS = [
    "--preset", "micro",
    "--set", f"train.max_steps={STEPS}", "--set", "train.seq_len=32", "--set", "train.micro_batch_size=8",
    "--set", "train.eval_every=10", "--set", "train.eval_steps=2", "--set", "train.ckpt_every=5",
    "--set", "train.keep_last=2", "--set", "train.device=cpu", "--set", "model.dropout=0.1",
]  # fmt: skip


def _losses(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r], [
        (r["step"], r["val_loss"]) for r in rows if "val_loss" in r
    ]


def _kill_at_random_step(cmd: list[str], metrics, lo: int, hi: int) -> int:
    """Starts cmd, SIGKILLs it once metrics.jsonl shows a step in [lo, hi); returns that step."""
    target = random.Random().randrange(lo, hi)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists():
                steps = [
                    json.loads(x).get("step", 0) for x in metrics.read_text().splitlines()[:-1]
                ]
                if steps and max(steps) >= target:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return max(steps)
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    pytest.fail(f"the run ended (rc={proc.returncode}) before reaching step {target}")


@pytest.mark.integration
def test_sigkill_and_resume_equals_an_uninterrupted_run(tmp_path):
    tokens, tok_dir = make_shards(tmp_path)
    common = ["pretrain", "--tokens", str(tokens), "--tokenizer", str(tok_dir), *ARGS]
    lmforge(*common, "--out", str(tmp_path / "full"))

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lmforge.cli", "--quiet", *common, "--out", str(killed)]
    died_at = _kill_at_random_step(cmd, killed / "metrics.jsonl", lo=7, hi=STEPS - 8)
    assert not (killed / "manifest.json").exists()
    lmforge(*common, "--out", str(killed))

    manifest = json.loads((killed / "manifest.json").read_text())
    resumed_from = manifest["metrics"]["resumed_from_step"]
    # the process may pass one more checkpoint between our read of metrics.jsonl and the kill
    assert resumed_from is not None and 5 <= resumed_from <= died_at + 5 and resumed_from % 5 == 0
    assert resumed_from < STEPS
    assert _losses(killed) == _losses(tmp_path / "full")  # every train and val loss, bitwise
    a = load_file(tmp_path / "full" / "final" / "model.safetensors")
    b = load_file(killed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def _steps(out) -> list[int]:
    return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]  # fmt: skip


@pytest.mark.integration
def test_force_retrains_and_changed_data_never_resumes(tmp_path):
    """--force starts from step 0; new input data with the same config does not resume the old
    run's checkpoints; neither rerun appends to the previous metrics.jsonl."""
    tokens, tok_dir = make_shards(tmp_path)
    out = tmp_path / "run"
    short = [a.replace(f"max_steps={STEPS}", "max_steps=10") for a in ARGS]
    cmd = ["pretrain", "--tokens", str(tokens), "--tokenizer", str(tok_dir), "--out", str(out)]
    lmforge(*cmd, *short)
    first = _steps(out)
    assert first == sorted(set(first)) and first[-1] == 10

    lmforge(*cmd, *short, "--force")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["resumed_from_step"] is None  # it used to resume at step 10
    assert _steps(out) == first  # one row per step, not the old rows plus new ones

    dtype = json.loads((tokens / "meta.json").read_text())["dtype"]
    ids = np.fromfile(tokens / "train.bin", dtype=dtype)
    ids[::-1].tofile(tokens / "train.bin")  # new data: the same tokens in reverse order
    lmforge(*cmd, *short)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["resumed_from_step"] is None
    assert _steps(out) == first
