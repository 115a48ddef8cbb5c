"""Runs stages: one from a CLI command, or a whole recipe in order with caching.

A recipe is YAML: `name`, optional `defaults` merged into every stage that has those keys, and
`stages` in the order they run; a stage's kind is its name unless it says `stage: KIND`. Values of the form "@stage" (or "@stage/sub/path") refer to
another stage's output directory in the same run. Every stage config is resolved and validated
before the first stage starts, so a typo in the last stage fails in a second, not an hour in.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from lmforge.artifacts import (
    Expectation,
    StageResult,
    fmt_duration,
    is_valid_result,
    run_stage,
)
from lmforge.common.io import atomic_write_json
from lmforge.common.logging import is_rank_zero
from lmforge.config import (
    Section,
    StageConfig,
    deep_merge,
    load_config,
    load_yaml,
    parse_override,
    set_dotted,
    validate,
)
from lmforge.errors import ConfigError
from lmforge.stages import DISTRIBUTED_KINDS, get_stage

log = logging.getLogger(__name__)


def run_single(
    kind: str,
    values: dict[str, Any],
    *,
    config_file: Path | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
) -> StageResult:
    """Runs one stage from a command's flags (YAML file < flags < --set overrides)."""
    stage = get_stage(kind)
    cfg = load_config(stage.config_cls, file=config_file, values=values, overrides=overrides or [])
    return run_stage(kind, cfg, stage.build, force=force, kind=kind)


class RecipeReference(Section):
    """How long each stage took on one machine, so a run elsewhere can say how long it will take."""

    machine: str = Field(
        description="the machine measured, e.g. '2-core AMD EPYC VM, torch 2.13 CPU'"
    )
    seconds: dict[str, float] = Field(description="stage name -> seconds it took there")


class Recipe(Section):
    """The top level of a recipe file."""

    name: str = Field(description="run name; artifacts go to runs/<name>/ unless --out is given")
    description: str = Field("", description="what the recipe does, shown in the report")
    defaults: dict[str, Any] = Field(
        default_factory=dict, description="keys merged into every stage that has them"
    )
    stages: dict[str, dict[str, Any]] = Field(
        description="stage name -> its config, plus 'stage: KIND' when the name is not the kind"
    )
    reference: RecipeReference | None = Field(
        None, description="measured stage times, for the run's early time estimate"
    )


@dataclass
class PlannedStage:
    """A recipe stage resolved to its kind and validated config."""

    name: str
    kind: str
    config: StageConfig


def builtin_recipe(name: str) -> Path | None:
    """The path of a recipe shipped in lmforge/recipes/, if `name` is one."""
    candidate = resources.files("lmforge.recipes") / f"{name}.yaml"
    return Path(str(candidate)) if candidate.is_file() else None


def resolve_recipe_path(recipe: str | Path) -> Path:
    """A file path, or the name of a built-in recipe (quickstart, ...)."""
    path = Path(recipe)
    if path.is_file():
        return path
    builtin = builtin_recipe(str(recipe))
    if builtin is not None:
        return builtin
    raise ConfigError(f"recipe {recipe} is neither a file nor a built-in recipe name")


def _resolve_refs(value: Any, run_dir: Path, known: list[str], stage: str) -> Any:
    if isinstance(value, str) and value.startswith("@"):
        ref, _, sub = value[1:].partition("/")
        if ref not in known:
            raise ConfigError(
                f"stage '{stage}': '{value}' refers to '{ref}', which is not an earlier stage "
                f"(earlier stages: {', '.join(known) or 'none'})"
            )
        return str(run_dir / ref / sub) if sub else str(run_dir / ref)
    if isinstance(value, dict):
        return {k: _resolve_refs(v, run_dir, known, stage) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_refs(v, run_dir, known, stage) for v in value]
    return value


def _only_known_keys(defaults: dict[str, Any], cls: type[BaseModel]) -> dict[str, Any]:
    return {k: v for k, v in defaults.items() if k in cls.model_fields}


def plan_recipe(
    recipe_file: Path, out: Path | None = None, overrides: list[str] | None = None
) -> tuple[Recipe, Path, list[PlannedStage]]:
    """Loads, overrides and validates every stage of a recipe without running anything."""
    recipe = validate(Recipe, load_yaml(recipe_file), where=str(recipe_file))
    run_dir = Path(out) if out else Path("runs") / recipe.name
    per_stage: dict[str, dict[str, Any]] = {
        name: dict(body or {}) for name, body in recipe.stages.items()
    }
    kinds = {name: str(body.pop("stage", name)) for name, body in per_stage.items()}
    unknown = sorted(set(recipe.reference.seconds) - set(kinds)) if recipe.reference else []
    if unknown:
        raise ConfigError(
            f"{recipe_file}: reference.seconds names no stage {', '.join(unknown)} "
            f"(stages: {', '.join(kinds)})"
        )
    classes = {name: get_stage(kind).config_cls for name, kind in kinds.items()}
    for name in per_stage:
        per_stage[name] = deep_merge(
            _only_known_keys(recipe.defaults, classes[name]), per_stage[name]
        )
    for text in overrides or []:
        key, value = parse_override(text)
        head, _, rest = key.partition(".")
        if head in per_stage and rest:
            set_dotted(per_stage[head], rest, value)
            continue
        targets = [n for n, cls in classes.items() if head in cls.model_fields]
        if not targets:
            raise ConfigError(
                f"--set {key}: no stage has '{head}' (stages: {', '.join(per_stage)}); "
                f"use <stage>.<key> to target one stage"
            )
        for name in targets:
            set_dotted(per_stage[name], key, value)
    planned: list[PlannedStage] = []
    for name, body in per_stage.items():
        body = _resolve_refs(body, run_dir, [p.name for p in planned], name)
        body["out"] = str(run_dir / name)
        cfg = validate(classes[name], body, where=f"{recipe_file} stage '{name}'")
        planned.append(PlannedStage(name, kinds[name], cfg))
    return recipe, run_dir, planned


def run_recipe(
    recipe: str | Path,
    *,
    out: Path | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
    only: str | None = None,
    from_stage: str | None = None,
    on_result: Callable[[str, StageResult], None] | None = None,
) -> list[tuple[str, StageResult]]:
    """Runs a recipe's stages in order; returns each stage's result.

    Args:
        only: run just this stage (the cache still applies unless force).
        from_stage: rerun this stage and every later one; earlier ones are left as they are.
        on_result: called as each stage finishes (the CLI prints its headline right away).
    """
    recipe_file = resolve_recipe_path(recipe)
    spec, run_dir, planned = plan_recipe(recipe_file, out, overrides)
    names = [p.name for p in planned]
    for flag, value in (("--only", only), ("--from", from_stage)):
        if value is not None and value not in names:
            raise ConfigError(f"{flag} {value}: no such stage (stages: {', '.join(names)})")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        run_dir / "run.json",
        {
            "name": spec.name,
            "description": spec.description,
            "recipe": str(recipe_file),
            "stages": [{"name": p.name, "kind": p.kind} for p in planned],
        },
    )
    start_index = names.index(from_stage) if from_stage else 0
    to_run = [
        p.name for i, p in enumerate(planned) if not (only and p.name != only) and i >= start_index
    ]
    if spec.reference is not None:
        total = sum(spec.reference.seconds.get(n, 0.0) for n in to_run)
        log.info(
            "%s: its stages took %s on the reference %s; the estimate for this machine "
            "follows after the first training steps",
            spec.name, fmt_duration(total), spec.reference.machine,
        )  # fmt: skip
    results: list[tuple[str, StageResult]] = []
    for index, step in enumerate(planned):
        if step.name not in to_run:
            continue
        stage_force = force or (from_stage is not None and index >= start_index)
        if is_rank_zero() or step.kind in DISTRIBUTED_KINDS:
            build = get_stage(step.kind).build
            expect = _expectation(spec.reference, step.name, to_run)
            result = run_stage(
                step.name, step.config, build, force=stage_force, kind=step.kind, expect=expect
            )
        else:
            result = wait_for_rank_zero(step, fresh=stage_force)
        results.append((step.name, result))
        if on_result is not None:
            on_result(step.name, result)
    return results


def _expectation(
    reference: RecipeReference | None, stage: str, to_run: list[str]
) -> Expectation | None:
    """This stage's and the later stages' reference seconds, when the recipe has them."""
    if reference is None or stage not in reference.seconds:
        return None
    rest = to_run[to_run.index(stage) + 1 :]
    return Expectation(
        machine=reference.machine,
        stage_s=reference.seconds[stage],
        rest_s=sum(reference.seconds.get(n, 0.0) for n in rest),
    )


def wait_for_rank_zero(step: PlannedStage, fresh: bool, poll_s: float = 1.0) -> StageResult:
    """Under torchrun, a non-zero rank waits while rank zero runs a single-process stage.

    Args:
        fresh: the stage is being forced, so only a manifest finished after now counts.
    """
    since = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    log.debug("waiting for rank 0 to finish %s", step.name)
    while True:
        manifest = is_valid_result(step.config)
        if manifest is not None and (not fresh or manifest.get("finished_at", "") >= since):
            return StageResult(
                Path(step.config.out), cached=True, metrics=manifest.get("metrics", {})
            )
        time.sleep(poll_s)
