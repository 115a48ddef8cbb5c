"""Fixtures: the fine-tuning tests' tiny tokenizer and micro model directories."""

from unit.finetune.conftest import model_dir, tokenizer_dir

__all__ = ["model_dir", "tokenizer_dir"]
