"""Exact and fuzzy deduplication, global across all workers.

Workers compute per-document keys (an xxh3 hash of the normalized text, a MinHash signature);
the main process decides over all keys at once, in document order, so the first document read
is the one kept and the result is identical whatever the number of workers.
"""

from __future__ import annotations

import numpy as np
import xxhash

from lmforge.data.minhash import cluster_duplicates, words_of


def exact_key(text: str) -> int:
    """xxh3-64 of the text with case, punctuation and whitespace differences removed."""
    return xxhash.xxh3_64_intdigest(" ".join(words_of(text)).encode())


def exact_duplicate_of(keys: np.ndarray) -> np.ndarray:
    """Index of the first document with the same key, or -1 for the first one itself."""
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    dup_of = first[inverse.reshape(-1)].astype(np.int64)
    dup_of[dup_of == np.arange(len(keys))] = -1
    return dup_of


def fuzzy_duplicate_of(
    sigs: np.ndarray, candidates: np.ndarray, bands: int, rows: int, threshold: float
) -> np.ndarray:
    """Among `candidates` (a bool mask), the index of the kept near-duplicate, or -1."""
    dup_of = np.full(len(sigs), -1, dtype=np.int64)
    idx = np.nonzero(candidates)[0]
    if len(idx):
        roots = idx[cluster_duplicates(np.asarray(sigs[idx]), bands, rows, threshold)]
        dup = roots != idx
        dup_of[idx[dup]] = roots[dup]
    return dup_of
