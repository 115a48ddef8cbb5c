"""Decontamination: find training documents that share a word n-gram (default 13) with eval sets.

Eval sets are text files or JSONL (every string field of a record counts). Their n-grams are
hashed once into a sorted array; each document's n-gram hashes are looked up vectorized.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from lmforge.data.minhash import ngram_hashes, words_of
from lmforge.data.readers import open_binary
from lmforge.errors import InputError


def _strings(obj: object) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def eval_texts(path: Path) -> Iterator[str]:
    """Texts of one eval file: JSONL records' string fields, or the whole file as text."""
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"decontam.eval_sets: {path} is not a file; pass eval set files (.jsonl or text)"
        )
    with open_binary(path) as fh:
        data = fh.read().decode("utf-8", errors="replace")
    if ".jsonl" in path.name or ".json" in path.name:
        for line in data.splitlines():
            if line.strip():
                try:
                    yield " ".join(_strings(json.loads(line)))
                except json.JSONDecodeError:
                    yield line
    else:
        yield data


class Decontaminator:
    """Answers "does this text share an n-gram with the eval sets?" in one vectorized lookup."""

    def __init__(self, texts: Iterable[str], ngram: int = 13) -> None:
        self.ngram = ngram
        grams = [ngram_hashes(w, ngram) for t in texts if len(w := words_of(t)) >= ngram]
        self.table = np.unique(np.concatenate(grams)) if grams else np.zeros(0, dtype=np.uint64)

    @classmethod
    def from_files(cls, paths: Iterable[Path], ngram: int = 13) -> Decontaminator:
        return cls((t for p in paths for t in eval_texts(p)), ngram)

    def overlap(self, text: str) -> int:
        """How many of the text's n-grams occur in an eval set."""
        words = words_of(text)
        if len(self.table) == 0 or len(words) < self.ngram:
            return 0
        h = ngram_hashes(words, self.ngram)
        pos = np.searchsorted(self.table, h).clip(max=len(self.table) - 1)
        return int(np.count_nonzero(self.table[pos] == h))
