"""Two tiny stages for testing the runner itself: `letters` counts letters, `shout` upper-cases.

They follow the stage contract exactly like real stages (StageConfig, build, registry entry), so
the cache, manifests and recipe logic are tested without training anything. `shout` can sleep
between files so a test can SIGKILL it mid-stage.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pydantic import Field

from lmforge.artifacts import StageContext
from lmforge.config import NOT_HASHED, Section, StageConfig
from lmforge.stages import register


class LettersOptions(Section):
    lowercase: bool = Field(True, description="count letters case-insensitively")


class LettersConfig(StageConfig):
    text: Path = Field(description="input text file")
    options: LettersOptions = LettersOptions()
    workers: int = Field(1, description="does not change the output", json_schema_extra=NOT_HASHED)

    def inputs(self) -> list[Path]:
        return [self.text]


def build_letters(cfg: LettersConfig, ctx: StageContext) -> dict:
    text = cfg.text.read_text()
    if cfg.options.lowercase:
        text = text.lower()
    counts = {c: text.count(c) for c in sorted(set(text)) if c.isalpha()}
    ctx.atomic_write_json(ctx.out / "counts.json", counts)
    ctx.metrics.log(step=1, letters=sum(counts.values()))
    return {"letters": sum(counts.values())}


class ShoutConfig(StageConfig):
    counts: Path = Field(description="a letters stage directory")
    repeat: int = Field(2, ge=1, le=100, description="how many files to write")
    sleep: float = Field(0.0, description="seconds between files", json_schema_extra=NOT_HASHED)

    def inputs(self) -> list[Path]:
        return [self.counts]


def build_shout(cfg: ShoutConfig, ctx: StageContext) -> dict:
    counts = json.loads((cfg.counts / "counts.json").read_text())
    for i in range(cfg.repeat):
        ctx.atomic_write_text(ctx.out / f"part_{i}.txt", "".join(counts).upper())
        time.sleep(cfg.sleep)
    return {"parts": cfg.repeat}


register("letters", f"{__name__}:LettersConfig:build_letters")
register("shout", f"{__name__}:ShoutConfig:build_shout")
