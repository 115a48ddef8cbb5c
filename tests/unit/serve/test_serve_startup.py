"""A server process's start-up: engine k failing stops engines 0..k-1 (and their embedders),
and a --workers N worker sets up lmforge's logging as the CLI did in the parent (its "serving
..." lines appear)."""

from __future__ import annotations

import json
import logging

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient

from lmforge.common import logging as lm_logging
from lmforge.errors import InputError
from lmforge.serve import state as state_module
from lmforge.serve.embeddings import Embedder
from lmforge.serve.engine import Engine, EngineClosed, SamplingParams
from lmforge.serve.metrics import MULTIPROC_ENV, ServerMetrics
from lmforge.serve.model_dir import ModelTasks
from lmforge.serve.runner import create_worker_app
from lmforge.serve.settings import ENV_CONFIG, ServeSettings
from lmforge.serve.state import ServeState, start_engines


class BrokenEngine:
    @classmethod
    def from_dir(cls, model_dir, **kw):
        raise InputError(f"{model_dir}: not a model directory")


def test_an_engine_failing_to_start_stops_those_already_started(
    serve_model_dir, tmp_path, monkeypatch
):
    started: list[Engine] = []
    embedders: list[Embedder] = []

    class RecordedEngine(Engine):
        def start(self) -> None:
            super().start()
            started.append(self)

    class RecordedEmbedder(Embedder):
        def start(self) -> None:
            super().start()
            embedders.append(self)

    bad = tmp_path / "bad"
    monkeypatch.setattr(
        state_module, "engine_class", lambda path: BrokenEngine if path == bad else RecordedEngine
    )
    monkeypatch.setattr(state_module, "Embedder", RecordedEmbedder)
    tasks = state_module.model_tasks  # the broken dir has no config.json to read
    monkeypatch.setattr(state_module, "model_tasks",
                        lambda path: ModelTasks(True, False) if path == bad else tasks(path))  # fmt: skip
    settings = ServeSettings(
        models=[{"name": "a", "path": serve_model_dir}, {"name": "b", "path": serve_model_dir},
                {"name": "c", "path": bad}],
        feedback_db=tmp_path / "f.db", device="cpu",
    )  # fmt: skip
    state = ServeState(settings=settings, metrics=ServerMetrics())
    with pytest.raises(InputError, match="not a model directory"):
        start_engines(state)
    assert len(started) == 2
    for engine in started:  # their decoding threads have ended and they take no requests
        assert not engine._thread.is_alive()
        with pytest.raises(EngineClosed):
            engine.submit([1, 2], SamplingParams(max_tokens=1), "late")
    assert state.engines == {} and state.model_ids == {}
    assert len(embedders) == 2 and state.embedders == {}  # the decoders' embedders stopped too
    for embedder in embedders:
        assert not embedder._thread.is_alive()
        with pytest.raises(EngineClosed):
            embedder.submit([1, 2])


@pytest.fixture
def restored_logging():
    """The lmforge logger and common.logging's state as they were before the test."""
    root = logging.getLogger("lmforge")
    saved = root.handlers[:], root.level, root.propagate, dict(lm_logging._state)
    yield
    root.handlers[:], root.level, root.propagate = saved[:3]
    lm_logging._state.clear()
    lm_logging._state.update(saved[3])


def test_logging_env_is_empty_until_logging_is_set_up(restored_logging, monkeypatch):
    lm_logging._state["set_up"] = False
    assert lm_logging.logging_env() == {}
    monkeypatch.delenv(lm_logging.LOG_ENV, raising=False)
    lm_logging.setup_logging_from_env()  # nothing to repeat: the logger is left alone
    assert lm_logging._state["set_up"] is False


def test_a_worker_logs_as_the_cli_set_up_the_parent(
    serve_model_dir, tmp_path, monkeypatch, capsys, restored_logging
):
    lm_logging.setup_logging(log_json=True)  # what `lmforge --log-json serve` ran in the parent
    env = lm_logging.logging_env()
    logging.getLogger("lmforge").handlers.clear()  # a fresh worker process: no handler yet
    lm_logging._state.update(json=False, set_up=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = ServeSettings(
        models=[{"name": "m", "path": serve_model_dir}], feedback_db=tmp_path / "f.db", workers=2
    )
    monkeypatch.setenv(ENV_CONFIG, settings.model_dump_json())
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)  # in-process: metrics in memory
    with TestClient(create_worker_app()) as client:
        assert client.get("/ready").status_code == 200
    records = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]
    messages = {r["logger"]: r["message"] for r in records if r["level"] == "info"}
    assert messages["lmforge.serve.state"].startswith(f"serving m from {serve_model_dir}")
    assert messages["lmforge.serve.server"].startswith("event loop ")
