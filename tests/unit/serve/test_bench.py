"""`lmforge serve bench` against a tiny FastAPI app on real uvicorn that speaks the OpenAI stream.

The app sends one token every TOKEN_GAP seconds without blocking its event loop, so the measured
inter-token latency and time to first token have known floors, and it counts the requests it
holds at once. Only what does not depend on the machine's load is asserted (counts, floors, the
report's consistency, clients never over the level); the gain from concurrency is a timing
ratio: benchmarks/bench_serve.py measures it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmforge.errors import InputError
from lmforge.serve.bench import bench_command, parse_concurrency, percentiles, run_bench
from lmforge.serve.launch import free_port

TOKEN_GAP = 0.02
SEEN: list[dict] = []  # request bodies the app received
IN_FLIGHT = {"now": 0, "peak": 0}  # completions the app is answering at once, and the most


def contract_app():
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI()

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": "tiny", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(body: dict):
        SEEN.append(body)
        if body["model"] != "tiny":
            error = {"message": f"model {body['model']!r} not found", "type": "invalid_request_error",
                     "param": "model", "code": "model_not_found"}  # fmt: skip
            return JSONResponse({"error": error}, status_code=404)

        async def events():
            IN_FLIGHT["now"] += 1
            IN_FLIGHT["peak"] = max(IN_FLIGHT["peak"], IN_FLIGHT["now"])
            try:
                for i in range(body["max_tokens"]):
                    await asyncio.sleep(TOKEN_GAP)
                    chunk = {"id": "cmpl-1", "choices": [{"index": 0, "text": f" t{i}"}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                usage = {"prompt_tokens": 3, "completion_tokens": body["max_tokens"]}
                yield f"data: {json.dumps({'id': 'cmpl-1', 'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                IN_FLIGHT["now"] -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(contract_app(), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the test app did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.mark.parametrize("clients", [1, 4])
def test_a_level_measures_every_request_with_at_most_its_clients_at_once(
    server_url: str, clients: int
) -> None:
    IN_FLIGHT["peak"] = 0
    result = run_bench(server_url, None, [clients], requests=8, max_tokens=5)
    assert result["model"] == "tiny"  # the first model /v1/models lists
    (level,) = result["levels"]
    assert (level["concurrency"], level["requests"], level["errors"]) == (clients, 8, 0)
    assert level["output_tokens"] == 40  # the server's usage counts
    assert 1 <= IN_FLIGHT["peak"] <= clients
    # floors the app's sleeps set, whatever the load: 8 requests of 5 gaps, `clients` at a time
    assert level["duration_s"] >= 8 / clients * 5 * TOKEN_GAP * 0.9
    assert level["itl_ms"]["p50"] >= 0.8 * TOKEN_GAP * 1000
    p = level["ttft_ms"]
    assert 0.8 * TOKEN_GAP * 1000 <= p["p50"] <= p["p90"] <= p["p99"]
    duration = level["duration_s"]  # the rates are the counts over the level's duration
    assert level["output_tokens_per_s"] == pytest.approx(40 / duration, rel=1e-3)
    assert level["requests_per_s"] == pytest.approx(8 / duration, rel=1e-3)


def test_server_errors_are_counted_with_their_message(server_url: str) -> None:
    (level,) = run_bench(server_url, "nope", [2], requests=3, max_tokens=2)["levels"]
    assert level["errors"] == 3 and level["output_tokens"] == 0
    assert level["error_samples"] == ["404: model 'nope' not found"]
    assert level["ttft_ms"] == {"p50": None, "p90": None, "p99": None}


def test_bench_command_writes_json_and_reads_the_prompts_file(
    server_url: str, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello"}\n{"prompt": "world"}\n')
    out = tmp_path / "bench.json"
    bench_command(
        url=server_url, start_model=None, model="tiny", concurrency="2", requests=2,
        max_tokens=2, prompts_file=str(prompts), out=str(out), ignore_eos=True,
    )  # fmt: skip
    assert sorted(b["prompt"] for b in SEEN[-2:]) == ["hello", "world"]
    assert all(b["ignore_eos"] and b["temperature"] == 1.0 and "seed" not in b for b in SEEN[-2:])
    written = json.loads(out.read_text())
    assert written["levels"][0]["output_tokens"] == 4
    assert written["levels"][0]["concurrency"] == 2


def test_bad_arguments_are_one_line_input_errors(tmp_path: Path) -> None:
    assert parse_concurrency("1, 4,16") == [1, 4, 16]
    for bad in ("", "0,4", "a,b"):
        with pytest.raises(InputError, match="expected positive integers"):
            parse_concurrency(bad)
    with pytest.raises(InputError, match="exactly one of --url"):
        bench_command(url=None, start_model=None, model=None, concurrency="1", requests=1,
                      max_tokens=1)  # fmt: skip
    with pytest.raises(InputError, match="prompts file not found"):
        bench_command(url="http://127.0.0.1:9", start_model=None, model="m", concurrency="1",
                      requests=1, max_tokens=1, prompts_file=str(tmp_path / "none.txt"))  # fmt: skip


def test_percentiles_in_milliseconds() -> None:
    values = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert percentiles(values) == {"p50": 50.5, "p90": 90.1, "p99": 99.01}


def test_cli_serve_bench_runs_against_a_url(server_url: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "cli.json"
    cmd = [sys.executable, "-m", "lmforge.cli", "serve", "bench", "--url", server_url,
           "--concurrency", "1,2", "--requests", "2", "--max-tokens", "3", "--out", str(out)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "TTFT ms" in res.stderr  # the table, on the console (stderr) as `lmforge config`
    assert [lv["output_tokens"] for lv in json.loads(out.read_text())["levels"]] == [6, 6]
    bad = subprocess.run([*cmd[:7], "--concurrency", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "expected positive integers" in bad.stdout + bad.stderr


def test_the_default_model_is_the_first_that_generates(monkeypatch) -> None:
    import httpx

    from lmforge.serve.bench import first_model

    listed: list[dict] = []
    monkeypatch.setattr(httpx, "get", lambda *a, **k: httpx.Response(200, json={"data": listed}))
    listed[:] = [{"id": "enc", "tasks": ["embed"]}, {"id": "dec", "tasks": ["generate", "embed"]}]
    assert first_model("http://x") == "dec"  # not the embedding-only encoder
    listed[:] = [{"id": "other"}]  # a server without tasks (vLLM, OpenAI): every model generates
    assert first_model("http://x") == "other"
    listed[:] = [{"id": "enc", "tasks": ["embed"]}]
    with pytest.raises(InputError, match="lists no model that generates; pass --model NAME"):
        first_model("http://x")
