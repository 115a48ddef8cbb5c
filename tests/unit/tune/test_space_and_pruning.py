"""Tune's search spaces, config checks, pruning hook and the loop's on_eval seam (no trials run)."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.config import load_config
from lmforge.errors import ConfigError
from lmforge.train.config import TrainConfig
from lmforge.train.loader import TokenWindows
from lmforge.train.loop import train
from lmforge.tune.space import ParamSpec
from lmforge.tune.stage import TuneConfig, pruning_hook
from unit.train.helpers import TinyLM, bigram_tokens, lm_loss, make_ctx

optuna = pytest.importorskip("optuna")

BASE = {
    "tokens": "/nowhere/tokens",
    "tokenizer": "/nowhere/tokenizer",
    "model": {"preset": "micro"},
    "train": {"max_steps": 20, "lr": 1e-5, "warmup_steps": 2},
}


def _tune(tmp_path, **kw) -> TuneConfig:
    data = {"out": str(tmp_path / "tune"), "stage": "pretrain", "base": BASE,
            "space": {"train.lr": {"low": 1e-4, "high": 3e-2, "log": True}}, **kw}  # fmt: skip
    return load_config(TuneConfig, values=data)


def test_a_trial_config_is_the_base_with_the_params_in_its_own_directory(tmp_path):
    cfg = _tune(tmp_path)
    trial = cfg.trial_config(3, {"train.lr": 2e-3})
    assert trial.train.lr == 2e-3 and trial.train.max_steps == 20
    assert trial.out == tmp_path / "tune" / "trials" / "3"
    assert BASE["train"]["lr"] == 1e-5  # the base is copied, never changed


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ({"train.lrr": {"low": 1e-4, "high": 1e-2}}, "unknown key 'train.lrr'"),
        ({"train.lr": {"low": 0.0, "high": 1e-2}}, "tune space key 'train.lr' = 0.0"),
        ({"train.lr": {"low": 1e-2, "high": 1e-4}}, "'space.train.lr'"),
        ({"train.lr": {"low": 0.0, "high": 1e-2, "log": True}}, "log: true needs low > 0"),
        ({"train.optimizer": {"type": "categorical"}}, "needs a non-empty 'choices'"),
        ({"train.optimizer": {"choices": ["adamw", "sgd"]}}, "'train.optimizer'"),
        ({"train.max_steps.x": {"low": 1, "high": 2}}, "'train.max_steps' is a value"),
        ({}, "'space' is empty"),
        (
            {"train.lr": {"lo": 1e-4}},
            "unknown key 'space.train.lr.lo' (allowed here: choices, high, log, low",
        ),
    ],
)
def test_a_bad_search_space_is_one_config_error_naming_the_key(tmp_path, space, expected):
    with pytest.raises(ConfigError) as err:
        _tune(tmp_path, space=space)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_grid_sampler_needs_points_for_a_range(tmp_path):
    with pytest.raises(ConfigError, match=r"tune space key 'train.lr'.*'points'"):
        _tune(tmp_path, sampler="grid")


def test_grid_values_of_ranges_and_choices():
    log = ParamSpec(low=1e-4, high=1e-2, log=True, points=3).grid("k")
    assert log == pytest.approx([1e-4, 1e-3, 1e-2]) and log[-1] == 1e-2
    assert ParamSpec(type="int", low=0, high=10, points=3).grid("k") == [0, 5, 10]
    assert ParamSpec(choices=["a", "b"]).grid("k") == ["a", "b"]


def test_default_study_name_follows_the_search_but_not_the_trial_count(tmp_path):
    a = _tune(tmp_path, trials=4).resolved_study_name()
    assert a == _tune(tmp_path, trials=40).resolved_study_name()
    assert a != _tune(tmp_path, sampler="random").resolved_study_name()
    assert a.startswith("pretrain-")
    assert _tune(tmp_path, study_name="shared").resolved_study_name() == "shared"


def test_pruning_hook_prunes_a_trial_worse_than_the_median():
    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    first = study.ask()
    first.report(1.0, 5)
    first.report(1.0, 10)
    study.tell(first, 1.0)
    good = study.ask()
    hook = pruning_hook(good, "val_loss")
    hook(5, {"val_ppl": 99.0})  # without the objective: nothing reported, nothing pruned
    hook(5, {"val_loss": 0.5})  # better than the median at step 5: goes on
    assert study._storage.get_trial(good._trial_id).intermediate_values == {5: 0.5}
    poor = study.ask()
    with pytest.raises(optuna.TrialPruned, match="val_loss=3 at step 10"):
        pruning_hook(poor, "val_loss")(10, {"val_loss": 3.0})


def test_the_loop_calls_on_eval_after_each_eval_and_stops_when_it_raises(tmp_path):
    tokens = bigram_tokens()
    cfg = TrainConfig(max_steps=30, lr=3e-2, micro_batch_size=8, seq_len=16, warmup_steps=3,
                      eval_every=10, eval_steps=2, ckpt_every=0, device="cpu")  # fmt: skip
    val = TokenWindows(tokens[-4000:], 16, 8, shuffle=False)
    seen: list[tuple[int, float]] = []

    def on_eval(step: int, evaluated: dict[str, float]) -> None:
        seen.append((step, evaluated["val_loss"]))
        if step == 20:
            raise RuntimeError("pruned")

    ctx = make_ctx(tmp_path)
    ctx.on_eval = on_eval
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="pruned"):
        train(TinyLM(), lm_loss, TokenWindows(tokens[:-4000], 16, 8), cfg, ctx,
              eval_fn=lambda m: {"val_loss": lm_loss(m, val.batch(0))[0].item()})  # fmt: skip
    ctx.metrics.close()
    assert [s for s, _ in seen] == [10, 20] and all(math.isfinite(v) for _, v in seen)


def test_a_recipe_tune_stage_refers_to_earlier_stages(tmp_path):
    from lmforge.runner import plan_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: r\n"
        "stages:\n"
        "  tokens: {data: /d, tokenizer: /t}\n"
        "  tune:\n"
        "    base: {tokens: '@tokens', tokenizer: /t, train: {max_steps: 20}}\n"
        "    space: {train.lr: {choices: [1.0e-3, 3.0e-3]}}\n"
        "    sampler: grid\n"
    )
    _, run_dir, planned = plan_recipe(recipe, out=tmp_path / "run")
    tune = planned[1].config
    assert planned[1].kind == "tune" and tune.out == run_dir / "tune"
    assert tune.base["tokens"] == str(run_dir / "tokens")
    assert tune.trial_config(1, {"train.lr": 3e-3}).tokens == run_dir / "tokens"


def test_a_storage_that_cannot_be_opened_is_a_config_error_naming_it(tmp_path):
    from lmforge.tune.study import open_storage

    cfg = _tune(tmp_path, storage="nosuchdb://host/db")
    with pytest.raises(ConfigError, match=r"tune storage 'nosuchdb://host/db' cannot be opened"):
        open_storage(cfg)


def test_default_study_name_follows_the_tuned_stages_input_versions(tmp_path, monkeypatch):
    """A data stage over the built-in corpus: a new corpus format is new data (the topics
    file, its one input path, is the same), so the search starts a fresh study."""
    from lmforge.data import stdlib_docs

    base = {"source": ["stdlib-docs"], "quality": {"gopher_quality": {"min_words": 50}}}
    space = {"quality.gopher_quality.min_words": {"low": 10, "high": 100, "type": "int"}}
    cfg = _tune(tmp_path, stage="data", base=base, space=space, objective="docs_out")
    assert cfg.input_versions() == stdlib_docs.corpus_versions()  # also in the tune's cache key
    name = cfg.resolved_study_name()
    assert name == cfg.resolved_study_name()
    monkeypatch.setattr(stdlib_docs, "CORPUS_FORMAT", stdlib_docs.CORPUS_FORMAT + 1)
    assert cfg.resolved_study_name() != name
