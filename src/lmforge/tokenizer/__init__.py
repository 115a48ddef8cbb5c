"""Tokenizers (train or import, HF layout, chat template) and token shards for pretraining."""

from lmforge.tokenizer.chat import ChatEncoding, encode_chat, render_chat
from lmforge.tokenizer.encode import EncodeConfig, encode
from lmforge.tokenizer.files import TokenizerFiles, tokenizer_hash
from lmforge.tokenizer.train import TokenizerConfig, train_tokenizer

__all__ = [
    "ChatEncoding",
    "EncodeConfig",
    "TokenizerConfig",
    "TokenizerFiles",
    "encode",
    "encode_chat",
    "render_chat",
    "tokenizer_hash",
    "train_tokenizer",
]
