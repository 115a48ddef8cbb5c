"""Session fixtures: tiny model directories (see helpers.py) shared by the eval tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import make_model_dir


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model_a"))


@pytest.fixture(scope="session")
def model_dir_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model_b"), seed=1, preset="micro-gpt2")
