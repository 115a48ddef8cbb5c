"""Train/val/test assignment and k-fold labels, decided by a seeded hash of each document.

A document's split depends only on its own key (normalized text by default) and the seed, never
on its position, so adding documents never moves old ones to another split.
"""

from __future__ import annotations

import xxhash

SPLITS = ("train", "val", "test")


def unit_hash(key: str, seed: int) -> float:
    """A deterministic number in [0, 1) for (key, seed)."""
    return xxhash.xxh3_64_intdigest(key.encode(), seed=seed) / 2**64


def assign_split(key: str, ratios: tuple[float, float, float], seed: int = 0) -> str:
    """'train', 'val' or 'test' with the given probabilities (they sum to 1)."""
    u = unit_hash(key, seed)
    edge = 0.0
    for name, ratio in zip(SPLITS, ratios, strict=True):
        edge += ratio
        if u < edge:
            return name
    return SPLITS[-1]


def assign_fold(key: str, folds: int, seed: int = 0) -> int:
    """Fold index in [0, folds), independent of the split hash (a different seed stream)."""
    return int(unit_hash(key, seed + 0x5F3759DF) * folds)


def mixture_copies(key: str, weight: float, seed: int = 0) -> int:
    """How many times a document appears for a source weight: floor(w), plus one with p = frac(w)."""
    whole = int(weight)
    return whole + (unit_hash(key, seed + 0x9E37) < weight - whole)
