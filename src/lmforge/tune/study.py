"""The Optuna side of tuning: storage with heartbeats, samplers, pruners, opening a shared study.

Several workers (processes or machines) run `lmforge tune` against one storage and share one
study. Each worker's running trial sends a heartbeat; a trial whose worker was killed stops
beating and is marked FAIL by the next worker that starts a trial (Optuna's fail_stale_trials),
so it shows up as failed instead of staying RUNNING forever.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.errors import ConfigError

if TYPE_CHECKING:
    import optuna

    from lmforge.tune.stage import TuneConfig

log = logging.getLogger(__name__)

# Trial states that count towards `trials`: a FAIL (a killed worker, a diverged run) is redone.
COUNTED = ("COMPLETE", "PRUNED")


def import_optuna() -> Any:
    """Optuna, or an ImportError naming the extra that installs it."""
    try:
        import optuna
    except ImportError as exc:
        raise ImportError("lmforge tune needs optuna: pip install 'lmforge[tune]'") from exc
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


@contextlib.contextmanager
def quiet_experimental() -> Iterator[None]:
    """Hides Optuna's ExperimentalWarning for heartbeats, a feature tune relies on on purpose."""
    optuna = import_optuna()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def storage_url(cfg: TuneConfig) -> str:
    """The configured database URL, or trials/study.db in the stage directory.

    Inside trials/ because other workers write it while a finishing worker hashes its outputs.
    """
    if cfg.storage:
        return cfg.storage
    path = (Path(cfg.out) / "trials" / "study.db").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def open_storage(cfg: TuneConfig) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats; SQLite waits for its lock instead of failing at once.

    Two workers starting together may race to create the tables; the loser retries.
    """
    optuna = import_optuna()
    url = storage_url(cfg)
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(3):
        try:
            with quiet_experimental():
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=cfg.heartbeat_s,
                    grace_period=cfg.grace_s or 2 * cfg.heartbeat_s,
                )
        except Exception as exc:  # a bad URL or an unreachable server: say which
            if attempt == 2:
                raise ConfigError(f"tune storage {url!r} cannot be opened: {exc}") from None
            time.sleep(1.0)
    raise AssertionError("unreachable")


def make_sampler(cfg: TuneConfig, seed: int) -> optuna.samplers.BaseSampler:
    """grid | random | tpe over cfg.space."""
    optuna = import_optuna()
    if cfg.sampler == "grid":
        grid = {key: spec.grid(key) for key, spec in cfg.space.items()}
        return optuna.samplers.GridSampler(grid, seed=seed)
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(n_startup_trials=cfg.startup_trials, seed=seed)


def make_pruner(cfg: TuneConfig) -> optuna.pruners.BasePruner:
    """none | median | halving, judging trials by the objective at each eval."""
    optuna = import_optuna()
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=cfg.startup_trials, n_warmup_steps=cfg.prune_warmup_steps
        )
    if cfg.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_early_stopping_rate=0)
    return optuna.pruners.NopPruner()


def open_study(cfg: TuneConfig) -> optuna.Study:
    """Creates the study, or joins it when another worker already has.

    The worker that creates the study samples with cfg.seed, so one worker is reproducible;
    a joining worker mixes its process id into the seed, or it would propose the very same
    parameters as the first one.
    """
    optuna = import_optuna()
    storage = open_storage(cfg)
    name, direction = cfg.resolved_study_name(), cfg.direction
    try:
        optuna.create_study(storage=storage, study_name=name, direction=direction)
        seed = cfg.seed
    except optuna.exceptions.DuplicatedStudyError:
        seed = cfg.seed * 1_000_003 + os.getpid()
        log.info("joining study %s (sampler seed %d)", name, seed)
    study = optuna.load_study(
        study_name=name,
        storage=storage,
        sampler=make_sampler(cfg, seed),
        pruner=make_pruner(cfg),
    )
    if study.direction.name.lower() != direction:
        raise ConfigError(
            f"study '{name}' in {storage_url(cfg)} is {study.direction.name.lower()}; "
            f"this config asks for {direction}: use another study_name"
        )
    return study


def count(study: optuna.Study, states: tuple[str, ...]) -> int:
    """How many of the study's trials are in any of these states (by name)."""
    optuna = import_optuna()
    wanted = tuple(optuna.trial.TrialState[name] for name in states)
    return len(study.get_trials(deepcopy=False, states=wanted))


def fail_stale(study: optuna.Study) -> None:
    """Marks trials of dead workers (no heartbeat within the grace period) FAIL."""
    optuna = import_optuna()
    with quiet_experimental():
        optuna.storages.fail_stale_trials(study)
