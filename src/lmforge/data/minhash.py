"""MinHash signatures and LSH banding, vectorized with numpy.

Shingles are word n-grams. Each word is hashed once (xxh64) and n-gram hashes are combined with
a vectorized polynomial, so a document costs one hash call per word plus a few array operations.
Permutations use multiply-shift hashing ((a*x + b) mod 2^64) >> 32 on 32-bit shingle hashes, a
universal family that needs no modulo. Clustering is global: band hashes of every document are
sorted per band, equal runs become candidate pairs, candidates are verified by estimated Jaccard,
and connected components keep their lowest document index (the first one read), so the result
does not depend on how documents were spread over workers.
"""

from __future__ import annotations

import re

import numpy as np
import xxhash

_WORD = re.compile(r"\w+")
_MIX = np.uint64(0x9E3779B97F4A7C15)
_CHUNK = 2048  # shingles per block, bounds the (num_perm, chunk) temporary


def words_of(text: str) -> list[str]:
    """Lowercased word tokens, punctuation dropped (the normal form used for shingles)."""
    return _WORD.findall(text.lower())


def ngram_hashes(words: list[str], n: int) -> np.ndarray:
    """64-bit hashes of every word n-gram (one n-gram of all words when there are fewer than n)."""
    if not words:
        return np.zeros(0, dtype=np.uint64)
    w = np.fromiter(
        (xxhash.xxh64_intdigest(x.encode()) for x in words), dtype=np.uint64, count=len(words)
    )
    n = min(n, len(w))
    h = np.zeros(len(w) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * _MIX + w[k : len(w) - n + 1 + k]
        h ^= h >> np.uint64(29)
        h *= _MIX
        h ^= h >> np.uint64(32)
    return h


class MinHasher:
    """Signatures of num_perm 32-bit minima; same seed = same permutations in every process."""

    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.num_perm, self.ngram = num_perm, ngram
        self.a = (
            rng.integers(1, 2**63, size=(num_perm, 1), dtype=np.uint64) << np.uint64(1)
        ) | np.uint64(1)
        self.b = rng.integers(0, 2**63, size=(num_perm, 1), dtype=np.uint64)

    def signature(self, text: str) -> np.ndarray:
        """uint32 array of length num_perm."""
        return self.signature_of_hashes(ngram_hashes(words_of(text), self.ngram))

    def signature_of_hashes(self, shingles: np.ndarray) -> np.ndarray:
        sig = np.full(self.num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)
        x = np.unique(shingles & np.uint64(0xFFFFFFFF))
        with np.errstate(over="ignore"):
            for start in range(0, len(x), _CHUNK):
                block = (self.a * x[None, start : start + _CHUNK] + self.b) >> np.uint64(32)
                np.minimum(sig, block.min(axis=1).astype(np.uint32), out=sig)
        return sig


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Fraction of equal minima: an unbiased estimate of the shingle sets' Jaccard similarity."""
    return float(np.mean(sig_a == sig_b))


def band_hashes(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n_docs, bands) uint64: each band's rows folded into one hash."""
    n = sigs.shape[0]
    parts = sigs[:, : bands * rows].reshape(n, bands, rows).astype(np.uint64)
    mult = (np.arange(1, rows + 1, dtype=np.uint64) * _MIX) | np.uint64(1)
    with np.errstate(over="ignore"):
        return (parts * mult).sum(axis=2, dtype=np.uint64) ^ np.arange(bands, dtype=np.uint64)


def candidate_pairs(bands_h: np.ndarray) -> np.ndarray:
    """(k, 2) array of (first doc of a bucket, other doc of that bucket), over all bands, unique."""
    pairs = []
    for j in range(bands_h.shape[1]):
        col = bands_h[:, j]
        order = np.argsort(col, kind="stable")
        vals = col[order]
        same = np.concatenate([[False], vals[1:] == vals[:-1]])
        if not same.any():
            continue
        run_start = np.maximum.accumulate(np.where(~same, np.arange(len(vals)), 0))
        members = np.nonzero(same)[0]
        pairs.append(np.stack([order[run_start[members]], order[members]], axis=1))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(pairs), axis=0)


def cluster_duplicates(
    sigs: np.ndarray, bands: int, rows: int, threshold: float, batch: int = 65536
) -> np.ndarray:
    """Boolean mask over documents: True for those that duplicate an earlier-kept document.

    Candidate pairs from LSH are kept when their estimated Jaccard >= threshold; each connected
    component keeps its smallest index.
    """
    n = sigs.shape[0]
    if n == 0:
        return np.zeros(0, dtype=bool)
    pairs = candidate_pairs(band_hashes(sigs, bands, rows))
    good = []
    for s in range(0, len(pairs), batch):
        p = pairs[s : s + batch]
        sim = (sigs[p[:, 0]] == sigs[p[:, 1]]).mean(axis=1)
        good.append(p[sim >= threshold])
    edges = np.concatenate(good) if good else np.zeros((0, 2), dtype=np.int64)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in edges.tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)  # the root is always the component's smallest index
    roots = np.array([find(i) for i in range(n)]) if len(edges) else parent
    return roots != np.arange(n)
