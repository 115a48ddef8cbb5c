"""The app under a real uvicorn on 127.0.0.1 (in a thread of this process), read by the official
openai client: under each event loop / HTTP parser pair the server is asked for, that pair is
what runs, streamed answers equal the whole answer, and a stream ends in one write -- the last
tokens, the usage chunk and [DONE] in the message that also ends the HTTP body. The streaming
response's ASGI messages are also checked on their own: its ends, and a client gone mid-stream
(either way a server tells it) closing the stream's generator at once."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")

import openai
import uvicorn

from lmforge.errors import ConfigError
from lmforge.serve.completions import SSE_DONE
from lmforge.serve.launch import free_port
from lmforge.serve.server import (
    ClosingStreamingResponse,
    create_app,
    event_loop_and_http,
    uvicorn_options,
)
from lmforge.serve.settings import ServeSettings

DONE = b"data: [DONE]\n\n"


class SendLog:
    """ASGI wrapper: every response body message (body, more_body) by request, in order."""

    def __init__(self, app) -> None:
        self.app = app
        self.bodies: dict[str, list[list[tuple[bytes, bool]]]] = defaultdict(list)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        messages: list[tuple[bytes, bool]] = []
        self.bodies[scope["path"]].append(messages)

        async def logged(message) -> None:
            if message["type"] == "http.response.body":
                messages.append((message.get("body", b""), message.get("more_body", False)))
            await send(message)

        await self.app(scope, receive, logged)


@contextmanager
def running(settings: ServeSettings, app):
    """uvicorn with serve()'s options for `settings`, in a thread, until the block ends."""
    server = uvicorn.Server(uvicorn.Config(app, **uvicorn_options(settings)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.mark.parametrize(
    ("loop", "http", "loop_module"),
    [("asyncio", "h11", "asyncio."), ("uvloop", "httptools", "uvloop.")],
)
def test_chosen_loop_runs_and_a_stream_ends_in_one_write(
    loop, http, loop_module, serve_model_dir, tmp_path, caplog
):
    pytest.importorskip(loop)
    pytest.importorskip(http)
    settings = ServeSettings(
        models=[{"name": "m", "path": serve_model_dir}], feedback_db=tmp_path / "f.db",
        port=free_port(), loop=loop, http=http,
    )  # fmt: skip
    app = SendLog(create_app(settings))
    caplog.set_level(logging.INFO, logger="lmforge.serve.server")
    with running(settings, app) as server:
        assert server.config.http_protocol_class.__module__.endswith(f".{http}_impl")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{settings.port}/v1", api_key="-")
        ask = dict(model="m", prompt="Hello there", max_tokens=12, temperature=0)
        whole = client.completions.create(**ask)
        pieces = list(
            client.completions.create(**ask, stream=True, stream_options={"include_usage": True})
        )
        chat_ask = dict(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
        chat_whole = client.chat.completions.create(**chat_ask, temperature=0)
        chat_pieces = list(client.chat.completions.create(**chat_ask, temperature=0, stream=True))
    assert f"event loop {loop_module}" in caplog.text  # the loop the lifespan ran on

    # the stream says what the whole answer says
    assert "".join(c.choices[0].text for c in pieces if c.choices) == whole.choices[0].text
    assert pieces[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert pieces[-1].usage.completion_tokens == whole.usage.completion_tokens
    chat_text = "".join(c.choices[0].delta.content or "" for c in chat_pieces)
    assert chat_text == chat_whole.choices[0].message.content

    for messages in (app.bodies["/v1/completions"][1], app.bodies["/v1/chat/completions"][1]):
        *before, (end, more_body) = messages
        assert more_body is False and end.endswith(DONE)  # no empty message after [DONE]
        assert b'"finish_reason": "' in end  # the last tokens' chunk rides with it
        assert all(body and more for body, more in before)
        assert DONE not in b"".join(body for body, _ in before)
    assert b'"usage": {"prompt_tokens"' in app.bodies["/v1/completions"][1][-1][0]


def test_auto_picks_what_is_installed_and_a_missing_choice_names_its_flag(tmp_path, monkeypatch):
    import importlib.util

    def settings(**kw) -> ServeSettings:
        return ServeSettings(models=[{"name": "m", "path": tmp_path}], **kw)

    installed = {"httptools"}  # uvloop missing
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: object() if name in installed else None
    )
    assert event_loop_and_http(settings()) == ("asyncio", "httptools")
    assert event_loop_and_http(settings(http="h11")) == ("asyncio", "h11")
    with pytest.raises(ConfigError, match="--loop uvloop: uvloop is not installed"):
        event_loop_and_http(settings(loop="uvloop"))
    installed = {"uvloop"}
    assert event_loop_and_http(settings()) == ("uvloop", "h11")
    with pytest.raises(ConfigError, match=r"--http httptools: .* or pass --http h11"):
        event_loop_and_http(settings(http="httptools"))


def respond(writes, spec_version="2.3", gone_after=None, then_wait=True):
    """The body messages ClosingStreamingResponse sends for a stream of `writes` (then, with
    `then_wait`, one that never comes, as from an engine still generating), and whether the
    stream's generator was closed. `gone_after`: the client disconnects once that many bodies
    were sent; a 2.3 server then says so through receive(), a 2.4 one by send() raising."""
    bodies: list[tuple[bytes, bool]] = []
    closed = []
    gone = asyncio.Event()

    async def stream():
        try:
            for write in writes:
                yield write
            if then_wait:  # generating: only the client's leaving ends this
                await asyncio.Event().wait()
        finally:
            closed.append(True)

    async def receive():
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if gone.is_set() and spec_version >= "2.4":
            raise OSError("connection reset by peer")
        if message["type"] == "http.response.body":
            bodies.append((message["body"], message["more_body"]))
            if len(bodies) == gone_after:
                gone.set()

    async def run() -> bool:
        scope = {"type": "http", "asgi": {"spec_version": spec_version}}
        response = ClosingStreamingResponse(stream(), media_type="text/event-stream")
        try:
            await asyncio.wait_for(response(scope, receive, send), timeout=10)
        except Exception as exc:  # starlette's ClientDisconnect under 2.4
            assert type(exc).__name__ == "ClientDisconnect", exc
        return closed == [True]  # now, not when asyncio.run finalizes leftover generators

    return bodies, asyncio.run(run())


def test_the_write_with_done_ends_the_body_and_an_error_end_still_closes_it():
    """[DONE]'s write ends the body and nothing is read after it (the stream would wait
    forever); a stream that ends on an error body gets the empty closing message."""
    bodies, closed = respond(["data: 1\n\n", "data: 2\n\n" + SSE_DONE])
    assert bodies == [(b"data: 1\n\n", True), (b"data: 2\n\n" + DONE, False)] and closed
    error = 'data: {"error": {"message": "the request timed out"}}\n\n'
    bodies, closed = respond(["data: 1\n\n", error], then_wait=False)
    assert bodies == [(b"data: 1\n\n", True), (error.encode(), True), (b"", False)] and closed


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
def test_a_client_gone_mid_stream_closes_the_generator(spec_version):
    """The generator's close is what aborts the request's engine jobs (completions.py)."""
    bodies, closed = respond(["data: 1\n\n", "data: 2\n\n"], spec_version, gone_after=1)
    assert closed
    assert all(more for _, more in bodies)  # no end of body was sent to nobody
    assert bodies[0] == (b"data: 1\n\n", True)
