"""Tokenizers (train or import, HF layout, chat template) and token shards for pretraining."""

from lmforge.tokenizer.encode import EncodeConfig, encode
from lmforge.tokenizer.files import TokenizerFiles, tokenizer_hash
from lmforge.tokenizer.train import TokenizerConfig, train_tokenizer

__all__ = [
    "EncodeConfig",
    "TokenizerConfig",
    "TokenizerFiles",
    "encode",
    "tokenizer_hash",
    "train_tokenizer",
]
