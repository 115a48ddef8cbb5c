"""Built-in preference pairs from the stdlib "explain this function" task (kind `preferences`).

For each record of the `tasks` stage's explain_{train,val,test}.jsonl, chosen is the real
docstring summary and rejected, by a seeded coin, is either a degenerate repetition of its first
words (a failure mode small models fall into) or the summary of a function from another module
of the same split (fluent but wrong). The splits stay the tasks stage's, so held-out pairs are about modules
no training pair saw. Writes prefs_{train,val,test}.jsonl in the prompt/chosen/rejected format
`lmforge align` reads, and stats.json.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from lmforge.artifacts import StageContext, require_artifact, run_stage
from lmforge.common.io import read_jsonl, write_jsonl
from lmforge.config import StageConfig

SPLITS = ("train", "val", "test")
TASKS_HINT = "lmforge run quickstart --only tasks (its tasks/ directory)"


class PreferencesConfig(StageConfig):
    """`stage: preferences` in a recipe: synthetic pairs from the built-in explain task."""

    tasks: Path = Field(description="the tasks stage's directory (explain_{train,val,test}.jsonl)")
    degenerate_fraction: float = Field(
        0.5, ge=0, le=1, description="share of rejected answers that are degenerate repetitions"
    )
    seed: int = Field(0, description="seed of the rejected-answer draws")

    def inputs(self) -> list[Path]:
        return [self.tasks / f"explain_{s}.jsonl" for s in SPLITS]


def degenerate(text: str, n_words: int = 3) -> str:
    """A degenerate answer: the text's first words repeated to about the text's length."""
    words = text.split()
    head = words[: max(1, min(n_words, len(words) - 1))]
    reps = max(3, -(-len(words) // len(head)))
    return " ".join(head * reps)


def synthetic_pairs(
    records: list[dict[str, Any]], seed: int, degenerate_fraction: float = 0.5
) -> list[dict[str, str]]:
    """Explain records (instruction, output[, category]) -> prompt/chosen/rejected, one each.

    Another function's answer comes from another module (`category`) when the split has one, so
    the rejected answer is about something else rather than a sibling method's near-paraphrase.
    """
    rng = np.random.default_rng(seed)
    outputs = [(r["output"], r.get("category")) for r in records]
    pairs = []
    for record in records:
        chosen, module = record["output"], record.get("category")
        others = [o for o, m in outputs if o != chosen and (m != module or module is None)]
        others = others or [o for o, _ in outputs if o != chosen]
        if rng.random() < degenerate_fraction or not others:
            rejected, kind = degenerate(chosen), "degenerate"
        else:
            rejected, kind = others[int(rng.integers(len(others)))], "other_function"
        pairs.append(
            {"prompt": record["instruction"], "chosen": chosen, "rejected": rejected, "kind": kind}
        )
    return pairs


def build(cfg: PreferencesConfig, ctx: StageContext) -> dict[str, Any]:
    """Writes prefs_{train,val,test}.jsonl and stats.json; returns pair counts."""
    require_artifact(cfg.tasks, [f"explain_{s}.jsonl" for s in SPLITS], hint=TASKS_HINT)
    counts: dict[str, Any] = {}
    for i, split in enumerate(SPLITS):
        records = list(read_jsonl(cfg.tasks / f"explain_{split}.jsonl"))
        pairs = synthetic_pairs(
            records, seed=cfg.seed * 1000 + i, degenerate_fraction=cfg.degenerate_fraction
        )
        write_jsonl(ctx.out / f"prefs_{split}.jsonl", pairs)
        counts[split] = len(pairs)
        counts[f"{split}_kinds"] = dict(Counter(p["kind"] for p in pairs))
    ctx.atomic_write_json(ctx.out / "stats.json", counts)
    return {f"{s}_pairs": counts[s] for s in SPLITS}


def make_preferences(cfg: PreferencesConfig, force: bool = False) -> Path:
    """Runs (or reuses) the preferences stage; returns its directory."""
    return run_stage("preferences", cfg, build, force=force).out
