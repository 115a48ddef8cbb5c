"""Where synonyms come from: WordNet through nltk when its corpus is installed, else a built-in list.

The WordNet corpus is a separate download (`nltk.download('wordnet')`) that many machines lack,
so `auto` checks for it once and falls back to resources/synonyms.json, a small hand-made list of
common English words that ships with the package. Which source was used is recorded next to every
augmentation, since the two give different rows.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Literal

from lmforge.errors import ConfigError

BUILTIN = Path(__file__).parent / "resources" / "synonyms.json"
SynonymSourceName = Literal["auto", "wordnet", "builtin"]


@functools.cache
def wordnet_available() -> bool:
    """True when nltk is importable and its WordNet corpus is installed locally."""
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
    except (ImportError, LookupError, OSError):
        return False
    return True


@functools.cache
def builtin_synonyms() -> dict[str, tuple[str, ...]]:
    """The packaged word -> synonyms list (lowercase single words)."""
    data = json.loads(BUILTIN.read_text(encoding="utf-8"))
    return {word: tuple(others) for word, others in data.items()}


class Synonyms:
    """synonyms(word) -> other single words of the same meaning, lowercase, sorted."""

    def __init__(self, source: SynonymSourceName = "auto") -> None:
        if source == "wordnet" and not wordnet_available():
            raise ConfigError(
                "augment.synonyms: wordnet, but nltk's WordNet corpus is not installed; run "
                "python -c \"import nltk; nltk.download('wordnet')\" or use synonyms: builtin"
            )
        if source == "auto":
            source = "wordnet" if wordnet_available() else "builtin"
        self.name = source

    @functools.lru_cache(maxsize=65536)  # noqa: B019 -- one Synonyms per augmenter, bounded
    def synonyms(self, word: str) -> tuple[str, ...]:
        word = word.lower()
        if self.name == "builtin":
            return builtin_synonyms().get(word, ())
        from nltk.corpus import wordnet

        found = {
            lemma.name().replace("_", " ").lower()
            for synset in wordnet.synsets(word)
            for lemma in synset.lemmas()
        }
        return tuple(sorted(w for w in found if w != word and " " not in w))
