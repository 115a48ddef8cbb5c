"""Tiny model directories for eval tests: a BPE tokenizer trained here and a 2-layer model.

The model is saved exactly as the training stages save theirs (save_pretrained + tokenizer files),
so the evals read it through the same loader real runs use.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "import os\nprint(os.getcwd())\n",
    "Lists are mutable sequences; tuples are immutable.",
    "for i in range(10):\n    print(i * i)\n",
    "A dictionary maps keys to values. Keys must be hashable.",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
    "Strings support slicing: s[1:3] returns two characters.",
]


def build_tokenizer(vocab_size: int = 300, specials: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|bos|>", "<|eos|>"] if specials else [],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def make_model_dir(
    path: Path, *, seed: int = 0, block_size: int = 64, specials: bool = True, preset="micro"
) -> Path:
    """Writes config.json + model.safetensors + tokenizer.json into path; returns path."""
    from lmforge.model.config import preset_config
    from lmforge.model.convert import save_pretrained
    from lmforge.model.transformer import Transformer

    tok = build_tokenizer(specials=specials)
    torch.manual_seed(seed)
    cfg = preset_config(preset, vocab_size=tok.get_vocab_size(), block_size=block_size)
    model = Transformer(cfg)
    extra = {}
    if specials:
        extra = {
            "bos_token_id": tok.token_to_id("<|bos|>"),
            "eos_token_id": tok.token_to_id("<|eos|>"),
        }
    save_pretrained(model, path, extra_config=extra)
    tok.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model_a"))


@pytest.fixture(scope="session")
def model_dir_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model_b"), seed=1, preset="micro-gpt2")


@pytest.fixture()
def rng() -> random.Random:
    return random.Random(0)
