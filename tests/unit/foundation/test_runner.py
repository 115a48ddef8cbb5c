"""The run cache: skip when unchanged, rerun exactly what changed, never trust a half stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.artifacts import read_manifest, require_artifact
from lmforge.errors import ConfigError, InputError
from lmforge.runner import run_recipe

from . import toy_stages  # noqa: F401  (registers the toy stage kinds)

RECIPE = """
name: toy
defaults:
  options: {lowercase: true}
stages:
  letters:
    text: {text}
  shout:
    counts: "@letters"
    repeat: 3
"""


@pytest.fixture()
def recipe(tmp_path: Path) -> Path:
    text = tmp_path / "input.txt"
    text.write_text("Hello World")
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.replace("{text}", str(text)))
    return path


def ran(results) -> dict[str, bool]:
    return {name: not r.cached for name, r in results}


def test_first_run_writes_manifests_second_run_skips(recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert ran(run_recipe(recipe, out=out)) == {"letters": True, "shout": True}
    manifest = read_manifest(out / "letters")
    assert manifest["status"] == "complete"
    assert manifest["metrics"] == {"letters": 10}
    assert manifest["outputs"].keys() == {"config.yaml", "counts.json", "metrics.jsonl"}
    assert set(manifest["versions"]) >= {"lmforge", "python"}
    assert manifest["config"]["options"] == {"lowercase": True}
    assert json.loads((out / "letters/counts.json").read_text())["l"] == 3
    assert ran(run_recipe(recipe, out=out)) == {"letters": False, "shout": False}


def test_force_reruns_everything(recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_recipe(recipe, out=out)
    assert ran(run_recipe(recipe, out=out, force=True)) == {"letters": True, "shout": True}


def test_changed_value_reruns_that_stage_and_later_only(recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_recipe(recipe, out=out)
    assert ran(run_recipe(recipe, out=out, overrides=["shout.repeat=4"])) == {
        "letters": False,
        "shout": True,
    }
    assert (out / "shout/part_3.txt").exists()
    # An upstream change whose output changes flows downstream.
    results = run_recipe(recipe, out=out, overrides=["shout.repeat=4", "options.lowercase=false"])
    assert ran(results) == {"letters": True, "shout": True}


def test_unhashed_setting_does_not_rerun(recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_recipe(recipe, out=out)
    assert ran(run_recipe(recipe, out=out, overrides=["letters.workers=8"])) == {
        "letters": False,
        "shout": False,
    }


def test_input_content_change_reruns(recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_recipe(recipe, out=out)
    (tmp_path / "input.txt").write_text("Different text")
    assert ran(run_recipe(recipe, out=out)) == {"letters": True, "shout": True}


def test_only_and_from(recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_recipe(recipe, out=out)
    assert ran(run_recipe(recipe, out=out, only="shout")) == {"shout": False}
    assert ran(run_recipe(recipe, out=out, from_stage="shout")) == {"shout": True}
    with pytest.raises(ConfigError, match="--only nope: no such stage"):
        run_recipe(recipe, out=out, only="nope")


def test_incomplete_stage_is_rerun_and_refused_as_input(recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_recipe(recipe, out=out)
    (out / "letters/manifest.json").unlink()  # what a killed stage leaves behind
    with pytest.raises(InputError, match="incomplete"):
        require_artifact(out / "letters", ["counts.json"], hint="lmforge run recipe.yaml")
    assert ran(run_recipe(recipe, out=out))["letters"] is True


def test_recipe_errors_fail_before_any_work(recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="no stage has 'nonsense'"):
        run_recipe(recipe, out=out, overrides=["nonsense=1"])
    with pytest.raises(
        ConfigError,
        match=r"stage 'shout': bad value for 'repeat': 1000: .*less than or equal to 100",
    ):
        run_recipe(recipe, out=out, overrides=["shout.repeat=1000"])
    assert not (out / "letters").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe.read_text().replace('"@letters"', '"@later"'))
    with pytest.raises(ConfigError, match="refers to 'later', which is not an earlier stage"):
        run_recipe(bad, out=out)


def test_reference_timings_scale_to_this_machine(tmp_path: Path, caplog) -> None:
    """A recipe's reference seconds become each stage's Expectation; the estimate scales them."""
    import logging
    import time

    from lmforge.artifacts import Expectation, StageContext
    from lmforge.runner import RecipeReference, _expectation

    ref = RecipeReference(machine="test VM", seconds={"a": 10, "b": 20, "c": 30})
    assert _expectation(ref, "b", ["a", "b", "c"]) == Expectation("test VM", 20, 30)
    assert _expectation(ref, "a", ["a", "c"]) == Expectation("test VM", 10, 30)  # b not run
    assert _expectation(None, "a", ["a"]) is None
    ctx = StageContext(
        out=tmp_path, stage="b", log=logging.getLogger("t"), metrics=None,
        expect=Expectation("test VM", 20, 30), started=time.perf_counter() - 10,
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="t"):
        ctx.announce_eta(30.0, "1,000 tokens/s on 2 CPU threads")  # 40 s here vs 20 s there
    text = caplog.text
    assert "1,000 tokens/s on 2 CPU threads, about 30 s left" in text
    assert "2.0x the time on the reference test VM" in text
    assert "the stages after it take about 1 min 00 s; the run ends in about 1 min 30 s" in text


def test_bad_reference_fails_before_any_work(tmp_path: Path, recipe: Path) -> None:
    recipe.write_text(recipe.read_text() + "reference: {machine: vm, seconds: {letters: fast}}\n")
    with pytest.raises(ConfigError, match=r"reference\.seconds\.letters"):
        run_recipe(recipe, out=tmp_path / "run")
    assert not (tmp_path / "run" / "letters").exists()


def test_reference_naming_an_unknown_stage_fails(tmp_path: Path, recipe: Path) -> None:
    recipe.write_text(recipe.read_text() + "reference: {machine: vm, seconds: {letterz: 1}}\n")
    with pytest.raises(ConfigError, match=r"reference\.seconds names no stage letterz"):
        run_recipe(recipe, out=tmp_path / "run")
