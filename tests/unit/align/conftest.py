"""Fixtures: the fine-tuning tests' tiny tokenizer and micro model directories."""

from pathlib import Path

import pytest

from unit.finetune.helpers import make_model_dir, make_tokenizer_dir


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return make_tokenizer_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model"), tokenizer_dir)
