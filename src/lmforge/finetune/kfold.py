"""k-fold cross-validation for small labeled sets: fold assignment and mean/std summaries.

Folds come from the data when every record carries a `fold` field (the data stage's assignment,
taken modulo k), otherwise from a seeded shuffle dealt round-robin, so each fold gets an equal
share. The finetune stage trains one model per held-out fold and reports each metric's mean and
standard deviation across folds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from lmforge.config import Section


class KFoldConfig(Section):
    """The `kfold:` section of finetune (classification tasks)."""

    k: int = Field(0, ge=0, description="folds for cross-validation (0 or 1 = off)")
    seed: int = Field(0, description="seed of the fold shuffle when records carry no `fold`")


def assign_folds(examples: list[dict[str, Any]], k: int, seed: int = 0) -> np.ndarray:
    """Fold index (0..k-1) of every example."""
    if examples and all(isinstance(e.get("fold"), int) for e in examples):
        return np.asarray([e["fold"] % k for e in examples], dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(examples))
    folds = np.empty(len(examples), dtype=np.int64)
    folds[order] = np.arange(len(examples)) % k
    return folds


def summarize(per_fold: list[dict[str, Any]]) -> dict[str, float]:
    """`cv_<metric>_mean` and `cv_<metric>_std` (population std) of every numeric metric."""
    keys = [k for k, v in per_fold[0].items() if isinstance(v, (int, float))]
    out: dict[str, float] = {"cv_folds": len(per_fold)}
    for key in keys:
        values = np.asarray([float(m[key]) for m in per_fold])
        out[f"cv_{key}_mean"] = round(float(values.mean()), 4)
        out[f"cv_{key}_std"] = round(float(values.std()), 4)
    return out
