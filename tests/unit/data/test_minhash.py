"""MinHash and dedup: estimates match exact Jaccard (and datasketch), LSH finds planted duplicates."""

from __future__ import annotations

import random

import numpy as np
from datasketch import MinHash

from lmforge.data.dedup import exact_duplicate_of, exact_key, fuzzy_duplicate_of
from lmforge.data.minhash import (
    MinHasher,
    cluster_duplicates,
    estimate_jaccard,
    ngram_hashes,
    words_of,
)

from .corpus import near_duplicate, prose


def _pairs(n_pairs: int = 24):
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(3000)]
    for k in range(n_pairs):
        base = [rng.choice(vocab) for _ in range(400)]
        keep = int(400 * k / n_pairs)
        other = base[:keep] + [rng.choice(vocab) for _ in range(400 - keep)]
        yield " ".join(base), " ".join(other)


def _exact_jaccard(a: str, b: str, n: int = 5) -> float:
    sa, sb = set(ngram_hashes(words_of(a), n).tolist()), set(ngram_hashes(words_of(b), n).tolist())
    return len(sa & sb) / len(sa | sb)


def _errors(num_perm: int) -> tuple[list[float], list[float]]:
    """|estimate - exact| for our MinHash and for datasketch's, on the same pairs."""
    hasher = MinHasher(num_perm=num_perm, ngram=5, seed=1)
    ours, theirs = [], []
    for a, b in _pairs():
        exact = _exact_jaccard(a, b)
        ours.append(abs(estimate_jaccard(hasher.signature(a), hasher.signature(b)) - exact))
        m1, m2 = MinHash(num_perm=num_perm, seed=1), MinHash(num_perm=num_perm, seed=1)
        for text, m in ((a, m1), (b, m2)):
            for gram in zip(*(words_of(text)[i:] for i in range(5)), strict=False):
                m.update(" ".join(gram).encode())
        theirs.append(abs(m1.jaccard(m2) - exact))
    return ours, theirs


def test_estimated_jaccard_within_005_of_exact():
    # The estimator's std is sqrt(J(1-J)/num_perm): with 1024 permutations every pair is within 0.05.
    ours, _ = _errors(1024)
    assert max(ours) < 0.05, ours


def test_default_num_perm_is_as_accurate_as_datasketch():
    ours, theirs = _errors(128)
    assert np.mean(ours) < 0.05
    assert np.mean(ours) < np.mean(theirs) + 0.01, (np.mean(ours), np.mean(theirs))


def test_signatures_are_deterministic_per_seed():
    a = MinHasher(64, seed=7).signature("the quick brown fox jumps over the lazy dog again")
    b = MinHasher(64, seed=7).signature("the quick brown fox jumps over the lazy dog again")
    c = MinHasher(64, seed=8).signature("the quick brown fox jumps over the lazy dog again")
    assert a.dtype == np.uint32 and np.array_equal(a, b) and not np.array_equal(a, c)


def test_lsh_recall_of_planted_near_duplicates_and_first_is_kept():
    hasher = MinHasher(128, 5, 1)
    originals = [prose(i, 15) for i in range(60)]
    docs = list(originals)
    planted = {}
    for i in range(0, 60, 3):
        planted[len(docs)] = i
        docs.append(near_duplicate(originals[i], seed=i, changes=2))
    sigs = np.stack([hasher.signature(d) for d in docs])
    roots = cluster_duplicates(sigs, bands=16, rows=8, threshold=0.7)
    assert (roots[:60] == np.arange(60)).all()  # originals are distinct, each one kept
    found = [roots[i] == orig for i, orig in planted.items()]
    assert np.mean(found) >= 0.95  # planted copies found, and attributed to their original


def test_exact_dedup_ignores_case_punctuation_and_spacing():
    keys = np.array(
        [exact_key(t) for t in ["Hello, World!", "hello world", "hello   world.", "other"]],
        dtype=np.uint64,
    )
    assert exact_duplicate_of(keys).tolist() == [-1, 0, 0, -1]


def test_fuzzy_only_considers_candidates():
    hasher = MinHasher(128, 5, 1)
    text = prose(1, 15)
    sigs = np.stack([hasher.signature(t) for t in (text, near_duplicate(text, 1), prose(2, 15))])
    both = fuzzy_duplicate_of(sigs, np.array([True, True, True]), 16, 8, 0.7)
    assert both.tolist() == [-1, 0, -1]
    first_excluded = fuzzy_duplicate_of(sigs, np.array([False, True, True]), 16, 8, 0.7)
    assert first_excluded.tolist() == [-1, -1, -1]
