"""`lmforge generate --draft-model`: the target's greedy answers, and bad drafts refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner
from unit.evals.helpers import make_model_dir, trained_model_dir

from lmforge.cli import app
from lmforge.errors import ConfigError
from lmforge.evals.lm import EvalModel, GenerationSettings
from lmforge.evals.speculative import speculative_sample

PROMPTS = ["def add(a, b):\n", "The quick brown", "import os\n"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A target trained for 60 steps and a draft of the same shape trained for 15: it agrees
    with the target on some tokens, not all."""
    root = tmp_path_factory.mktemp("spec")
    return trained_model_dir(root / "target"), trained_model_dir(root / "draft", steps=15)


@pytest.mark.parametrize(
    "draft_options",
    [["--draft-tokens", "3"], ["--draft-schedule", "heuristic", "--draft-confidence", "0.3"]],
)
def test_cli_answers_are_the_targets_greedy_ones(dirs, tmp_path: Path, draft_options) -> None:
    target, draft = dirs
    out = tmp_path / "answers.jsonl"
    args = ["-p", PROMPTS[0], "-p", PROMPTS[1], "--max-new-tokens", "16", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", "generate", "--model", str(target),
         "--draft-model", str(draft), *draft_options, *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    expected = EvalModel.load(target).generate_batch(
        PROMPTS[:2], GenerationSettings(max_new_tokens=16)
    )
    assert [json.loads(line)["completion"] for line in out.read_text().splitlines()] == expected
    assert "draft acceptance" in proc.stderr and "target passes" in proc.stderr


def test_draft_acceptance_is_partial_for_a_weaker_draft_and_full_for_the_target(dirs) -> None:
    target, draft = (EvalModel.load(d) for d in dirs)
    settings = GenerationSettings(max_new_tokens=20)
    expected = target.generate_batch(PROMPTS, settings)
    rows, weak = speculative_sample(target, draft, PROMPTS, settings, draft_tokens=4)
    assert [r["completion"] for r in rows] == expected
    assert 0 < weak.acceptance_rate < 1
    rows, same = speculative_sample(target, target, PROMPTS, settings, draft_tokens=4)
    assert [r["completion"] for r in rows] == expected
    assert same.acceptance_rate == 1.0
    assert same.target_passes < weak.target_passes


def test_a_draft_with_another_tokenizer_is_refused(dirs, tmp_path: Path) -> None:
    target = EvalModel.load(dirs[0])
    other = EvalModel.load(make_model_dir(tmp_path / "other", specials=False))
    with pytest.raises(ConfigError, match="has another tokenizer"):
        speculative_sample(target, other, PROMPTS, GenerationSettings())


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"temperature": 0.7}, "--temperature > 0"),
        ({"num_beams": 2}, "--num-beams > 1"),
        ({"repetition_penalty": 1.2}, "--repetition-penalty"),
        ({"no_repeat_ngram_size": 2}, "logits rules"),
    ],
)
def test_settings_that_are_not_plain_greedy_are_refused(dirs, settings, named) -> None:
    target = EvalModel.load(dirs[0])
    with pytest.raises(ConfigError, match=named):
        speculative_sample(target, target, PROMPTS, GenerationSettings(**settings))


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--draft-schedule", "fast"], "--draft-schedule 'fast': pick one of constant, heuristic"),
        (["--draft-schedule", "backoff"], "add --draft-model DIR or drop them"),
        (["--draft-confidence", "0.4"], "add --draft-model DIR or drop them"),
    ],
)
def test_draft_options_are_checked_before_a_model_loads(tmp_path: Path, options, named) -> None:
    missing = tmp_path / "no-model"  # never read: the options are refused first
    res = CliRunner().invoke(app, ["generate", "--model", str(missing), "-p", "hi", *options])
    assert res.exit_code != 0
    assert isinstance(res.exception, ConfigError) and named in str(res.exception), res.output
