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


def exact_duplicate_mask(keys: np.ndarray) -> np.ndarray:
    """True for every document whose key already appeared earlier."""
    dup = np.ones(len(keys), dtype=bool)
    _, first = np.unique(keys, return_index=True)
    dup[first] = False
    return dup


def fuzzy_duplicate_mask(
    sigs: np.ndarray, candidates: np.ndarray, bands: int, rows: int, threshold: float
) -> np.ndarray:
    """True for documents (among `candidates`, a bool mask) that near-duplicate an earlier one."""
    dup = np.zeros(len(sigs), dtype=bool)
    idx = np.nonzero(candidates)[0]
    if len(idx):
        dup[idx] = cluster_duplicates(np.asarray(sigs[idx]), bands, rows, threshold)
    return dup
