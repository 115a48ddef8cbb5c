"""`lmforge tune` end to end: micro pretrain trials, shared SQLite studies, killed workers."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lmforge.runner import run_single

from .test_pretrain_stage import lmforge, make_shards

optuna = pytest.importorskip("optuna")

POOR_LR = 1e-5
TRAIN = {"max_steps": 20, "lr": POOR_LR, "seq_len": 32, "micro_batch_size": 8, "eval_every": 5,
         "eval_steps": 2, "ckpt_every": 0, "warmup_steps": 2, "device": "cpu"}  # fmt: skip


def _write_config(root: Path, tokens: Path, tok_dir: Path, **kw) -> Path:
    base = {"tokens": str(tokens), "tokenizer": str(tok_dir), "model": {"preset": "micro"}}
    config = {
        "stage": "pretrain",
        "base": {**base, "train": TRAIN},
        "space": {"train.lr": {"low": 1e-4, "high": 3e-2, "log": True}},
        **kw,
    }
    path = root / "tune.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _study(out: Path) -> optuna.Study:
    storage = f"sqlite:///{out / 'trials' / 'study.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage)


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.integration
def test_tune_finds_a_better_learning_rate_than_a_poor_start(tmp_path):
    tokens, tok_dir = make_shards(tmp_path)
    base = run_single("pretrain", {"tokens": tokens, "tokenizer": tok_dir, "out": tmp_path / "base",
                                   "model": {"preset": "micro"}, "train": TRAIN})  # fmt: skip
    config = _write_config(tmp_path, tokens, tok_dir, startup_trials=2)
    out = tmp_path / "tune"
    lmforge("tune", "--config", str(config), "--trials", "4", "--out", str(out))

    results = json.loads((out / "trials.json").read_text())
    best = results["best"]
    assert best["value"] < base.metrics["val_loss"] - 0.3  # far better than lr 1e-5
    best_cfg = yaml.safe_load((out / "best.yaml").read_text())
    assert best_cfg["train"]["lr"] == best["params"]["train.lr"] != POOR_LR
    assert 1e-4 <= best_cfg["train"]["lr"] <= 3e-2
    assert best_cfg["out"] == str(out / "trials" / str(best["number"]))
    rows = _csv(out / "trials.csv")
    assert [int(r["number"]) for r in rows] == [0, 1, 2, 3]
    for row in rows:  # every finished trial is a complete stage run with its params and value
        trial_dir = Path(row["dir"])
        if row["state"] == "COMPLETE":
            manifest = json.loads((trial_dir / "manifest.json").read_text())
            assert manifest["kind"] == "pretrain"
            assert manifest["config"]["train"]["lr"] == float(row["params.train.lr"])
            record = json.loads((trial_dir / "trial.json").read_text())
            assert record["val_loss"] == manifest["metrics"]["val_loss"] == float(row["value"])
        else:  # pruned: stopped early, no manifest, so nothing mistakes it for a finished run
            assert row["state"] == "PRUNED" and not (trial_dir / "manifest.json").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["best_val_loss"] == best["value"]
    assert "best.yaml" in manifest["outputs"]  # trials/ has its own manifests and the live study
    assert not any(name.startswith("trials/") for name in manifest["outputs"])
    assert manifest["metrics"]["complete"] + manifest["metrics"]["pruned"] == 4
    for png in ("optimization_history.png", "param_importance.png"):
        assert (out / png).stat().st_size > 5000, png
    assert results["importance"] == {"train.lr": pytest.approx(1.0)}

    from lmforge.evals.report import write_report

    write_report(out)
    report = (out / "report.md").read_text()
    assert f"the best, trial {best['number']}, reached val_loss" in report
    assert "optimization_history.png" in report and "param_importance.png" in report

    again = lmforge(
        "tune", "--config", str(config), "--trials", "4", "--out", str(out), quiet=False
    )
    assert "cached" in again.stdout + again.stderr


@pytest.mark.integration
def test_two_workers_share_one_sqlite_study_without_losing_a_trial(tmp_path):
    tokens, tok_dir = make_shards(tmp_path, n_docs=100)
    config = _write_config(tmp_path, tokens, tok_dir, pruner="none", sampler="random")
    out = tmp_path / "tune"
    cmd = [sys.executable, "-m", "lmforge.cli", "--quiet", "tune", "--config", str(config),
           "--trials", "4", "--out", str(out)]  # fmt: skip
    workers = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in workers:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]

    trials = _study(out).get_trials()
    assert len(trials) >= 4  # a worker may start one more while the other finishes its last
    assert [t.number for t in trials] == list(range(len(trials)))
    assert {t.state.name for t in trials} == {"COMPLETE"}
    assert len({t.params["train.lr"] for t in trials}) == len(trials)  # workers sample apart
    for t in trials:
        manifest = json.loads((out / "trials" / str(t.number) / "manifest.json").read_text())
        assert manifest["metrics"]["val_loss"] == t.value
    assert [int(r["number"]) for r in _csv(out / "trials.csv")] == list(range(len(trials)))


@pytest.mark.integration
def test_a_killed_workers_trial_is_marked_failed_not_lost(tmp_path):
    tokens, tok_dir = make_shards(tmp_path, n_docs=100)
    config = _write_config(tmp_path, tokens, tok_dir, heartbeat_s=1, grace_s=2, study_name="s")
    out = tmp_path / "tune"
    cmd = [sys.executable, "-m", "lmforge.cli", "--quiet", "tune", "--config", str(config),
           "--trials", "1", "--out", str(out)]  # fmt: skip
    endless = ["--set", "base.train.max_steps=1000000", "--set", "base.train.eval_every=1000000"]
    worker = subprocess.Popen([*cmd, *endless], stderr=subprocess.PIPE, start_new_session=True)
    metrics = out / "trials" / "0" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.stat().st_size > 0):  # trial 0 is training
        assert worker.poll() is None and time.monotonic() < deadline, "trial 0 never started"
        time.sleep(0.2)
    assert _study(out).trials[0].state.name == "RUNNING"
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    time.sleep(3)  # longer than grace_s: trial 0's heartbeat is now stale

    lmforge("tune", "--config", str(config), "--trials", "1", "--out", str(out))
    states = [t.state.name for t in _study(out).trials]
    assert states == ["FAIL", "COMPLETE"]
    assert [r["state"] for r in _csv(out / "trials.csv")] == ["FAIL", "COMPLETE"]
    assert not (out / "trials" / "0" / "manifest.json").exists()
    assert json.loads((out / "manifest.json").read_text())["metrics"]["fail"] == 1


@pytest.mark.integration
def test_bad_search_space_is_one_line_naming_the_key(tmp_path):
    config = _write_config(tmp_path, tmp_path, tmp_path, space={"train.lrr": {"low": 1, "high": 2}})
    proc = lmforge("tune", "--config", str(config), "--out", str(tmp_path / "t"), check=False,
                   quiet=False)  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown key 'train.lrr'" in lines[0], proc.stderr
