"""Fixtures: a micro model fitted to a small corpus (unit.evals.helpers), and a val split."""

from __future__ import annotations

from pathlib import Path

import pytest

from unit.evals.helpers import CORPUS, trained_model_dir, write_split


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained micro model directory with tokenizer.json; tests must not modify it."""
    return trained_model_dir(tmp_path_factory.mktemp("compress") / "model")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("data")
    write_split(directory, "val", CORPUS)
    return directory
