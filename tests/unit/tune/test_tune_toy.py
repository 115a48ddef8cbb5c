"""tune over a toy stage kind (no training): grid search, maximize, a missing objective."""

from __future__ import annotations

import csv
import json

import pytest

from lmforge.artifacts import run_stage
from lmforge.config import load_config
from lmforge.errors import ConfigError
from lmforge.tune.stage import TuneConfig, build, tune
from unit.foundation import toy_stages  # registers the letters and shout kinds

pytest.importorskip("optuna")


def _cfg(tmp_path, **kw) -> TuneConfig:
    text = tmp_path / "in.txt"
    text.write_text("Hello tune")
    letters = run_stage("letters", load_config(
        toy_stages.LettersConfig, values={"text": text, "out": tmp_path / "l"}),
        toy_stages.build_letters).out  # fmt: skip
    data = {"out": tmp_path / "tune", "stage": "shout", "base": {"counts": str(letters)},
            "space": {"repeat": {"type": "int", "low": 1, "high": 5, "points": 3}},
            "sampler": "grid", "pruner": "none", "objective": "parts", "direction": "maximize",
            "trials": 10, **kw}  # fmt: skip
    return load_config(TuneConfig, values=data)


def test_grid_search_tries_every_point_once_and_keeps_the_best(tmp_path):
    out = tune(_cfg(tmp_path))
    with open(out / "trials.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(int(r["params.repeat"]) for r in rows) == [1, 3, 5]  # the grid ran out first
    assert all(r["state"] == "COMPLETE" and float(r["value"]) == float(r["params.repeat"])
               for r in rows)  # fmt: skip
    results = json.loads((out / "trials.json").read_text())
    assert results["best"]["params"] == {"repeat": 5} and results["best"]["value"] == 5
    best_dir = out / "trials" / str(results["best"]["number"])
    assert sorted(p.name for p in best_dir.glob("part_*.txt")) == [
        f"part_{i}.txt" for i in range(5)
    ]
    assert json.loads((best_dir / "manifest.json").read_text())["kind"] == "shout"
    assert json.loads((best_dir / "trial.json").read_text()) == {
        "number": results["best"]["number"], "params": {"repeat": 5}, "parts": 5}  # fmt: skip


def test_an_objective_the_stage_does_not_report_is_a_config_error(tmp_path):
    cfg = _cfg(tmp_path, objective="val_loss", direction="minimize")
    with pytest.raises(
        ConfigError, match=r"objective 'val_loss' is not a metric of stage shout.*parts"
    ):
        run_stage("tune", cfg, build)
