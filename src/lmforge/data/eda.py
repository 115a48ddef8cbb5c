"""EDA (Wei & Zou, 2019): synonym replacement, random insertion, random swap, random deletion.

Each operation takes a text, the share of its words to touch (alpha) and a seeded Random, and
returns the new text. Words are whitespace tokens; a synonym keeps the punctuation around the
word it replaces and its capitalization, so "Big," becomes "Large,", not "large".
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from lmforge.data.synonyms import Synonyms
from lmforge.data.terms import match_case

_CORE = re.compile(r"^(\W*)(\w[\w'-]*\w|\w)(\W*)$")


def _split_word(token: str) -> tuple[str, str, str] | None:
    """(leading punctuation, word, trailing punctuation), or None for a token with no word."""
    m = _CORE.match(token)
    return (m.group(1), m.group(2), m.group(3)) if m else None


def _n_changes(n_words: int, alpha: float) -> int:
    return max(1, int(alpha * n_words))


def _replaceable(words: list[str], syn: Synonyms) -> list[int]:
    out = []
    for i, token in enumerate(words):
        parts = _split_word(token)
        if parts and syn.synonyms(parts[1]):
            out.append(i)
    return out


def synonym_replace(text: str, alpha: float, rng: random.Random, syn: Synonyms) -> str:
    """Replaces up to alpha * words distinct words that have synonyms with one of them."""
    words = text.split()
    candidates = _replaceable(words, syn)
    rng.shuffle(candidates)
    for i in candidates[: _n_changes(len(words), alpha)]:
        lead, word, trail = _split_word(words[i])  # type: ignore[misc]
        words[i] = lead + match_case(rng.choice(syn.synonyms(word)), word) + trail
    return " ".join(words)


def random_insert(text: str, alpha: float, rng: random.Random, syn: Synonyms) -> str:
    """Inserts a synonym of a random word (that has one) at a random position, alpha * words times."""
    words = text.split()
    candidates = _replaceable(words, syn)
    if not candidates:
        return text
    for _ in range(_n_changes(len(words), alpha)):
        word = _split_word(words[rng.choice(candidates)])[1].lower()  # type: ignore[index]
        words.insert(rng.randint(0, len(words)), rng.choice(syn.synonyms(word)))
        candidates = _replaceable(words, syn)
    return " ".join(words)


def random_swap(text: str, alpha: float, rng: random.Random, syn: Synonyms | None = None) -> str:
    """Swaps two random words, alpha * words times."""
    words = text.split()
    if len(words) < 2:
        return text
    for _ in range(_n_changes(len(words), alpha)):
        i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
    return " ".join(words)


def random_delete(text: str, alpha: float, rng: random.Random, syn: Synonyms | None = None) -> str:
    """Drops each word with probability alpha, keeping at least one."""
    words = text.split()
    if len(words) < 2:
        return text
    kept = [w for w in words if rng.random() >= alpha]
    return " ".join(kept) if kept else rng.choice(words)


Operation = Callable[[str, float, random.Random, Synonyms], str]
OPERATIONS: dict[str, Operation] = {
    "synonym": synonym_replace,
    "insert": random_insert,
    "swap": random_swap,
    "delete": random_delete,
}
