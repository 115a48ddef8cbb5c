"""Tiny corpora in the data stage's layout ({train,val}.jsonl.zst) and one trained BPE to share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lmforge.common.io import write_jsonl
from lmforge.tokenizer import TokenizerConfig, train_tokenizer

WORDS = "the model reads text and learns which token follows which one in a sequence".split()


def make_corpus(root: Path, n_train: int = 300, n_val: int = 40, n_test: int = 0) -> Path:
    """Writes a data-stage directory of short English-like documents with digits and accents."""
    rng = np.random.default_rng(0)

    def doc(i: int) -> dict:
        words = rng.choice(WORDS, size=int(rng.integers(5, 40)))
        return {"text": " ".join(words) + f". Item {i} costs 12.5 € — naïve café!", "id": str(i)}

    root.mkdir(parents=True, exist_ok=True)
    splits = {"train": range(n_train), "val": range(n_train, n_train + n_val)}
    if n_test:
        splits["test"] = range(n_train + n_val, n_train + n_val + n_test)
    for split, ids in splits.items():
        write_jsonl(root / f"{split}.jsonl.zst", (doc(i) for i in ids))
    return root


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def bpe_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE of 400 ids trained on `corpus` (read-only: tests must not modify it)."""
    out = tmp_path_factory.mktemp("tok") / "bpe"
    return train_tokenizer(TokenizerConfig(data=corpus, out=out, vocab_size=400))
