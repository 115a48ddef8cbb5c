"""Start-up reads each of a model directory's JSON files once (common.json_cache keeps the parse):
`lmforge serve` starting an engine and its embedder read config.json 6 times and
generation_config.json 3 times, `lmforge generate` 2 and 7 times. Text-mode opens are counted by
file name; content_hash's binary read of every file is no parse."""

from __future__ import annotations

import builtins
import io
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.common import json_cache
from lmforge.serve.metrics import ServerMetrics
from lmforge.serve.settings import ServeSettings
from lmforge.serve.state import ServeState, start_engines
from unit.serve.test_generation_config import with_generation_config

JSON_FILES = ("config.json", "generation_config.json", "tokenizer_config.json")


@pytest.fixture
def settled_dir(serve_model_dir, tmp_path, monkeypatch) -> Path:
    """A copy of the serve model directory with a generation_config.json, its files settled (as
    a model directory being served is): last changed longer ago than json_cache.SETTLE_S, here
    shortened so that the test need not wait its 2 s."""
    out = with_generation_config(Path(shutil.copytree(serve_model_dir, tmp_path / "m")))
    monkeypatch.setattr(json_cache, "SETTLE_S", 0.05)
    time.sleep(0.1)
    return out


@pytest.fixture
def text_reads(monkeypatch) -> Counter[str]:
    """Text-mode opens of JSON_FILES from now on, by file name."""
    counts: Counter[str] = Counter()
    real = builtins.open

    def counted(file, mode="r", *args, **kwargs):
        if "b" not in mode and os.path.basename(str(file)) in JSON_FILES:
            counts[os.path.basename(str(file))] += 1
        return real(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counted)
    monkeypatch.setattr(io, "open", counted)  # pathlib's read_text opens through io.open
    return counts


def test_serve_start_up_parses_each_json_file_once(settled_dir, text_reads, tmp_path):
    settings = ServeSettings(models=[{"name": "m", "path": settled_dir}],
                             feedback_db=tmp_path / "f.db", device="cpu")  # fmt: skip
    state = ServeState(settings=settings, metrics=ServerMetrics())
    start_engines(state)
    try:
        assert set(state.engines) == set(state.embedders) == {"m"}  # a decoder embeds too
        assert text_reads == {name: 1 for name in JSON_FILES}
    finally:
        for engine in (*state.engines.values(), *state.embedders.values()):
            engine.shutdown(drain=False)


def test_generate_parses_each_json_file_once(settled_dir, text_reads):
    result = CliRunner().invoke(
        app, ["generate", "--model", str(settled_dir), "-p", "Hello", "--max-new-tokens", "2"]
    )
    assert result.exit_code == 0, result.output
    assert text_reads == {name: 1 for name in JSON_FILES}
