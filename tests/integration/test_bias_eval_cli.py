"""Bias checks end to end with a planted shortcut: data report, counterfactual eval, run report.

A micro classifier is trained on sentences whose label is decided by the subject's gender alone
("she"/"the woman" -> care, "he"/"the man" -> build), while the place (church or mosque) is
drawn independently of the label. The data-side report must show gender perfectly split by
label and religion balanced; `lmforge eval` with a counterfactual task must find a large gender
gap and a small religion one; the run report must show both.
"""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner
from unit.finetune.helpers import make_model_dir, make_tokenizer_dir

from lmforge.cli import app
from lmforge.data import prepare
from lmforge.evals.report import write_report
from lmforge.finetune.stage import FinetuneConfig, finetune

pytestmark = pytest.mark.integration

FEMALE, MALE = ["she", "the woman", "her sister"], ["he", "the man", "his brother"]
VERBS = ["paints", "repairs", "visits", "cleans", "describes", "guards"]
OBJECTS = ["the wall", "a bridge", "the garden", "a tower", "the kitchen", "a window"]


def _sentence(rng, subjects, place=None):
    place = place or rng.choice(["church", "mosque"])
    return f"{rng.choice(subjects)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} near the {place}."


def _planted(path, n=160):
    rng = random.Random(0)
    rows = []
    for i in range(n):
        care = i % 2 == 0
        rows.append({"id": f"r{i}", "text": _sentence(rng, FEMALE if care else MALE),
                     "label": "care" if care else "build"})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_planted_gap_shows_in_data_eval_and_report(tmp_path):
    run = tmp_path / "run"
    data_file = _planted(tmp_path / "planted.jsonl")
    prepare({"source": [str(data_file)], "out": str(run / "data"), "workers": 1,
             "language": {"enabled": False}, "quality": {"preset": "lenient"},
             "dedup": {"fuzzy": False}, "bias": {"enabled": True}})  # fmt: skip
    stats = json.loads((run / "data" / "stats.json").read_text())["bias"]["train"]["groups"]
    gender, religion = stats["gender"]["sides"], stats["religion"]["sides"]
    assert set(gender["female"]["by_label"]) == {"care"}
    assert set(gender["male"]["by_label"]) == {"build"}
    assert (
        set(religion["christian"]["by_label"])
        == set(religion["muslim"]["by_label"])
        == {
            "care",
            "build",
        }
    )
    cli = CliRunner()
    shown = cli.invoke(app, ["data", "stats", str(run / "data"), "--bias", "--group", "gender"])
    assert shown.exit_code == 0, shown.output
    assert "female" in shown.output and "religion" not in shown.output

    model = make_model_dir(tmp_path / "base", make_tokenizer_dir(tmp_path / "tok"))
    finetune(FinetuneConfig.model_validate({
        "model": model, "data": data_file, "out": run / "classify", "task": "classify",
        "train": {"max_steps": 40, "lr": 3e-3, "micro_batch_size": 16, "seq_len": 32,
                  "warmup_steps": 2, "eval_every": 40, "eval_steps": 1, "ckpt_every": 0},
    }))  # fmt: skip

    rng = random.Random(1)
    prompts = [_sentence(rng, FEMALE + MALE, place) for place in ("church", "mosque")] * 6
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"text": p}) + "\n" for p in prompts)
    )
    task = tmp_path / "bias.yaml"
    task.write_text("type: counterfactual\ndata: prompts.jsonl\ngroups: [gender, religion]\n")
    res = cli.invoke(
        app,
        [
            "eval",
            "--model",
            str(run / "classify"),
            "--tasks",
            str(task),
            "--out",
            str(run / "eval"),
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((run / "eval" / "eval.json").read_text())
    (metrics,) = report["results"].values()
    groups = metrics["bias"]["groups"]
    assert metrics["bias"]["scoring"] == "P(build)"
    assert groups["gender"]["mean_gap"] > 0.3  # male wording pushes towards "build"
    assert groups["religion"]["mean_abs_gap"] < groups["gender"]["mean_abs_gap"] / 5
    assert metrics["bias"]["worst_group"] == "gender"
    assert (run / "eval" / "plots" / "bias_classify_bias.png").exists()

    md = write_report(run).with_suffix(".md").read_text()
    assert "Counterfactual bias" in md and "Demographic terms in the data" in md
    print(json.dumps({g: {k: v for k, v in d.items() if k != "worst"} for g, d in groups.items()}))
