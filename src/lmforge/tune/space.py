"""Search spaces: dotted config keys of the tuned stage with a range or a list of choices.

A space is YAML like

    space:
      train.lr: {low: 1.0e-4, high: 3.0e-2, log: true}
      train.warmup_steps: {type: int, low: 0, high: 20}
      model.preset: {choices: [micro, tiny]}

Every key is checked against the tuned stage's own config class before any trial runs, by
validating the base config with each bound (or choice) put in: a typo or an impossible bound is
one ConfigError line naming the key.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

from pydantic import Field, model_validator

from lmforge.config import Section, StageConfig, set_dotted, validate
from lmforge.errors import ConfigError


class ParamSpec(Section):
    """One searched key: a float/int range (optionally log-scaled) or categorical choices."""

    type: Literal["float", "int", "categorical"] | None = Field(
        None,
        description="float | int | categorical (default: categorical with choices, else float)",
    )
    low: float | None = Field(None, description="smallest value tried (float/int)")
    high: float | None = Field(None, description="largest value tried (float/int)")
    log: bool = Field(False, description="sample on a log scale (low must be > 0)")
    step: float | None = Field(None, description="quantize the range to multiples of this")
    choices: list[Any] | None = Field(None, description="the values tried (categorical)")
    points: int | None = Field(
        None, ge=2, description="grid sampler only: how many values of the range to try"
    )

    @model_validator(mode="after")
    def _check(self) -> ParamSpec:
        kind = self.kind
        if kind == "categorical":
            if not self.choices:
                raise ValueError("a categorical key needs a non-empty 'choices' list")
            if self.low is not None or self.high is not None:
                raise ValueError("give either 'choices' or 'low'/'high', not both")
            return self
        if self.choices is not None:
            raise ValueError(f"type {kind} takes 'low'/'high', not 'choices'")
        if self.low is None or self.high is None:
            raise ValueError(f"a {kind} range needs both 'low' and 'high'")
        if not self.low < self.high:
            raise ValueError(f"'low' ({self.low:g}) must be below 'high' ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got {self.low:g})")
        if self.log and self.step is not None:
            raise ValueError("'step' and log: true cannot be combined")
        if kind == "int" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ValueError("an int range needs whole-number 'low' and 'high'")
        return self

    @property
    def kind(self) -> str:
        return self.type or ("categorical" if self.choices is not None else "float")

    def bounds(self) -> list[Any]:
        """The extreme values a trial can get, for checking them against the stage config."""
        if self.kind == "categorical":
            return list(self.choices or [])
        cast = int if self.kind == "int" else float
        return [cast(self.low), cast(self.high)]

    def grid(self, key: str) -> list[Any]:
        """The values the grid sampler tries: the choices, or `points` values of the range."""
        if self.kind == "categorical":
            return list(self.choices or [])
        if self.points is None:
            raise ConfigError(
                f"tune space key '{key}': the grid sampler needs 'points' (how many values of "
                f"the range to try) or 'choices'"
            )
        low, high, n = float(self.low), float(self.high), self.points  # type: ignore[arg-type]
        if self.log:
            values = [
                math.exp(math.log(low) + i * (math.log(high / low)) / (n - 1)) for i in range(n)
            ]
        else:
            values = [low + i * (high - low) / (n - 1) for i in range(n)]
        values[-1] = high  # exact end point, not high * (1 ± rounding)
        if self.kind == "int":
            return sorted({round(v) for v in values})
        return values


def suggest(trial: Any, key: str, spec: ParamSpec) -> Any:
    """Asks an Optuna trial for this key's value."""
    if spec.kind == "categorical":
        return trial.suggest_categorical(key, spec.choices)
    if spec.kind == "int":
        step = int(spec.step) if spec.step else 1
        return trial.suggest_int(key, int(spec.low), int(spec.high), step=step, log=spec.log)
    return trial.suggest_float(key, spec.low, spec.high, step=spec.step, log=spec.log)


def with_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of the base config with each dotted key set to its trial value."""
    data = copy.deepcopy(base)
    for key, value in params.items():
        try:
            set_dotted(data, key, value)
        except ConfigError:
            head = key.rsplit(".", 1)[0]
            raise ConfigError(
                f"tune space key '{key}': '{head}' is a value in the base config, not a section"
            ) from None
    return data


def check_space(
    cls: type[StageConfig], kind: str, base: dict[str, Any], space: dict[str, ParamSpec]
) -> None:
    """Validates the base config, then the base with every bound of every key put in."""
    placeholder = {"out": base.get("out", "tune-check")}
    validate(cls, {**base, **placeholder}, where=f"tune base ({kind} config)")
    for key, spec in space.items():
        for value in spec.bounds():
            data = with_params({**base, **placeholder}, {key: value})
            validate(cls, data, where=f"tune space key '{key}' = {value!r} ({kind} config)")
