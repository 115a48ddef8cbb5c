"""`lmforge tune`: hyperparameter search over any stage kind's config (stage kind "tune").

A trial is an ordinary stage run of the tuned kind (e.g. pretrain) in `<out>/trials/<n>/`
through run_stage, so it gets the cache, config.yaml, manifest.json and atomic writes like any
stage; its params and objective also go to `trial.json`. The objective is one of the headline
metrics the stage returns (val_loss by default). The training loop calls `ctx.on_eval` after
every evaluation; tune reports the objective there, and a trial that is doing worse than its
peers is pruned (it stops, its directory stays without a manifest, the study records PRUNED).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from lmforge.artifacts import StageContext, content_hash, run_stage
from lmforge.config import NOT_HASHED, StageConfig, hashed_dump, validate
from lmforge.errors import ConfigError, StageError
from lmforge.stages import get_stage
from lmforge.tune.results import write_results
from lmforge.tune.space import ParamSpec, check_space, suggest, with_params
from lmforge.tune.study import COUNTED, count, fail_stale, import_optuna, open_study

log = logging.getLogger(__name__)


class TuneConfig(StageConfig):
    """What to tune (a stage kind and its base config), over which keys, and how to search."""

    stage: str = Field("pretrain", description="stage kind each trial runs (pretrain, finetune…)")
    base: dict[str, Any] = Field(
        description="the tuned stage's config (without out); trials change only the space keys"
    )
    space: dict[str, ParamSpec] = Field(
        description="dotted config key -> {low, high, log, type} or {choices: [...]}"
    )
    trials: int = Field(20, ge=1, description="trials to complete (pruned count; failed do not)")
    sampler: Literal["grid", "random", "tpe"] = Field("tpe", description="grid | random | tpe")
    pruner: Literal["none", "median", "halving"] = Field(
        "median", description="stop poor trials early: none | median | halving (successive)"
    )
    objective: str = Field("val_loss", description="headline metric of the stage to optimize")
    direction: Literal["minimize", "maximize"] = Field("minimize", description="of the objective")
    startup_trials: int = Field(
        4, ge=0, description="trials before TPE models the space and the median pruner prunes"
    )
    prune_warmup_steps: int = Field(0, ge=0, description="never prune before this training step")
    seed: int = Field(0, description="sampler seed of the worker that creates the study")
    storage: str | None = Field(
        None, description="Optuna database URL shared by workers (default: out/trials/study.db)"
    )
    study_name: str | None = Field(
        None,
        description="study to create or join (default: <stage>-<hash of this config and the "
        "inputs' content and versions>; give one name to workers whose paths differ)",
    )
    heartbeat_s: int = Field(
        10, ge=1, description="seconds between a running trial's heartbeats",
        json_schema_extra=NOT_HASHED,
    )  # fmt: skip
    grace_s: int | None = Field(
        None, ge=1, description="a trial silent this long is failed (default 2 x heartbeat_s)",
        json_schema_extra=NOT_HASHED,
    )  # fmt: skip

    @model_validator(mode="after")
    def _check_space(self) -> TuneConfig:
        if not self.space:
            raise ConfigError("tune: 'space' is empty; name at least one key, e.g. train.lr")
        if self.stage == "tune":
            raise ConfigError("tune: 'stage' cannot be tune itself; name the stage to tune")
        check_space(get_stage(self.stage).config_cls, self.stage, self.base, self.space)
        if self.sampler == "grid":
            for key, spec in self.space.items():
                spec.grid(key)
        return self

    def trial_config(self, number: int, params: dict[str, Any]) -> StageConfig:
        """The tuned stage's config for one trial, writing into trials/<number>/."""
        data = with_params(self.base, params)
        data["out"] = str(Path(self.out) / "trials" / str(number))
        return validate(get_stage(self.stage).config_cls, data, where=f"tune trial {number}")

    def inputs(self) -> list[Path]:
        """The tuned stage's inputs: a trial reruns when they change."""
        return self.trial_config(0, {}).inputs()

    def input_versions(self) -> dict[str, str]:
        """The tuned stage's input versions (e.g. the stdlib-docs corpus format), like inputs()."""
        return self.trial_config(0, {}).input_versions()

    def resolved_study_name(self) -> str:
        """The study name: given, or derived so that a changed search never continues an old one.

        Everything hashed except `trials` goes in, plus the inputs' content and versions, so
        raising `trials` continues the same study while new data (or data from a newer builder)
        or a new space starts a fresh one.
        """
        if self.study_name:
            return self.study_name
        data = hashed_dump(self)
        data.pop("trials", None)
        data["inputs"] = sorted(content_hash(p) for p in self.inputs())
        if versions := self.input_versions():  # no key without: those studies keep their names
            data["input_versions"] = versions
        digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
        return f"{self.stage}-{digest[:12]}"


def pruning_hook(trial: Any, objective: str) -> Callable[[int, dict[str, float]], None]:
    """ctx.on_eval for one trial: reports the objective, raises TrialPruned when it lags."""
    optuna = import_optuna()

    def on_eval(step: int, evaluated: dict[str, float]) -> None:
        if objective not in evaluated:
            return
        trial.report(float(evaluated[objective]), step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"{objective}={evaluated[objective]:.4g} at step {step}")

    return on_eval


def run_trial(cfg: TuneConfig, trial: Any) -> float:
    """The Optuna objective: suggest params, run the stage in its trial dir, return the metric."""
    params = {key: suggest(trial, key, spec) for key, spec in cfg.space.items()}
    stage_cfg = cfg.trial_config(trial.number, params)
    trial.set_user_attr("dir", str(stage_cfg.out))
    kind = get_stage(cfg.stage)
    hook = pruning_hook(trial, cfg.objective)

    def build(c: StageConfig, ctx: StageContext) -> dict[str, Any]:
        metrics = kind.build(c, dataclasses.replace(ctx, on_eval=hook)) or {}
        value = metrics.get(cfg.objective)
        if not isinstance(value, (int, float)):
            raise ConfigError(
                f"tune objective '{cfg.objective}' is not a metric of stage {cfg.stage} "
                f"(its metrics: {', '.join(sorted(metrics))}); set objective to one of them"
            )
        record = {"number": trial.number, "params": params, cfg.objective: value}
        ctx.atomic_write_json(ctx.out / "trial.json", record)
        return metrics

    log.info("trial %d: %s", trial.number, params)
    result = run_stage(f"trial-{trial.number}", stage_cfg, build, kind=cfg.stage)
    return float(result.metrics[cfg.objective])


def build(cfg: TuneConfig, ctx: StageContext) -> dict[str, Any]:
    """Runs trials until the study holds cfg.trials finished ones, then writes the results."""
    optuna = import_optuna()
    study = open_study(cfg)
    fail_stale(study)
    done = count(study, COUNTED)
    if done < cfg.trials:

        def enough(study: optuna.Study, _: Any) -> None:
            # running trials of other workers count too, so workers do not overshoot together
            if count(study, (*COUNTED, "RUNNING")) >= cfg.trials:
                study.stop()

        study.optimize(
            lambda trial: run_trial(cfg, trial),
            n_trials=cfg.trials - done,
            callbacks=[enough],
            catch=(StageError,),  # a diverged trial fails; the search goes on
            gc_after_trial=True,
        )
    fail_stale(study)
    return write_results(study, cfg, ctx)


def tune(cfg: TuneConfig, force: bool = False) -> Path:
    """Runs (or joins) a search; returns the stage directory with trials.csv and best.yaml."""
    return run_stage("tune", cfg, build, force=force).out
