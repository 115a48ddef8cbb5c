"""The app in-process (real engine, Starlette's test client): readiness around the lifespan, 503
once the engines are closed, the API key from the environment, errors on unknown routes."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient

from lmforge.serve.server import create_app
from lmforge.serve.settings import ENV_API_KEY, ServeSettings


@pytest.fixture
def settings(serve_model_dir, tmp_path):
    return ServeSettings(
        models=[{"name": "m", "path": serve_model_dir}], feedback_db=tmp_path / "f.db"
    )


def test_closed_engine_is_503_and_not_ready(settings):
    app = create_app(settings)
    with TestClient(app) as client:
        assert client.get("/ready").json() == {"status": "ready", "models": ["m"]}
        body = {"model": "m", "prompt": "hi", "max_tokens": 2, "temperature": 0}
        assert client.post("/v1/completions", json=body).status_code == 200
        app.state.serve.engines["m"].shutdown()
        r = client.post("/v1/completions", json={**body, "prompt": "not cached"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "closed"
    assert app.state.serve.ready is False  # the lifespan's shutdown ran


def test_api_key_from_env_and_unknown_routes(settings, monkeypatch):
    monkeypatch.setenv(ENV_API_KEY, "envkey")
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/models").status_code == 401
        ok = client.get("/v1/models", headers={"Authorization": "Bearer envkey"})
        assert ok.json()["data"][0]["id"] == "m"
        assert client.get("/health").status_code == 200  # probes stay open
        missing = client.get("/v1/nothing", headers={"Authorization": "Bearer envkey"})
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def test_a_streamed_answer_refused_by_the_output_filter_stops_decoding(settings, tmp_path):
    """The real engine: once the filter refuses the answer, its request is aborted, so the
    stream ends after a few tokens rather than the max_tokens nobody will see."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "rules:\n  - {name: anything, pattern: '\\S', action: refuse, apply_to: [outputs]}\n"
    )
    app = create_app(settings.model_copy(update={"safety": policy}))
    body = {"model": "m", "prompt": "hi", "max_tokens": 100, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    with TestClient(app) as client:
        text = client.post("/v1/completions", json=body).text
        scrape = client.get("/metrics").text
    assert '"finish_reason": "content_filter"' in text and text.endswith("data: [DONE]\n\n")
    generated = re.search(r'lmforge_generation_tokens_total\{model="m"\} (\S+)', scrape)
    assert 1 <= float(generated.group(1)) < 50
