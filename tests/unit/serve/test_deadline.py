"""The request deadline: one that fires after every choice's final event, with the choices' end
markers still on the way, leaves a complete answer complete (no 504, its feedback row written);
one that fires before the last final event is still a timeout. The deadline is fired by hand
from inside a fake handle, at the exact point of the race, so the tests are deterministic."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from lmforge.serve.completions import SSE_DONE, CompletionService, Job, Prepared
from lmforge.serve.engine import SamplingParams
from lmforge.serve.handle import TokenEvent
from lmforge.serve.metrics import ServerMetrics


class Deadline:
    """Stands in for the event loop's call_later: holds the deadline's callback until fire()."""

    def __init__(self) -> None:
        self.callbacks: list = []

    def call_later(self, delay, callback, *args):
        self.callbacks.append((callback, args))
        return SimpleNamespace(cancel=lambda: None)

    def fire(self) -> None:
        for callback, args in self.callbacks:
            callback(*args)


class RacingHandle:
    """A request whose deadline fires after `fire_after` of its events: between its final event
    and its end marker, or before its final event (it then waits for the abort that never
    comes: a request still decoding at its deadline)."""

    def __init__(self, request_id: str, events: list[TokenEvent], deadline: Deadline, fire_after):
        self.request_id, self.prompt_tokens = request_id, 3
        self.events, self.deadline, self.fire_after = events, deadline, fire_after
        self.finished = fire_after == len(events)
        self.first_token_at, self.submitted_at, self.token_times = None, 0.0, []

    async def batches(self):
        for i, event in enumerate(self.events, start=1):
            yield [event]
            if i == self.fire_after:
                self.deadline.fire()
                if not self.finished:
                    await asyncio.get_running_loop().create_future()


class RacingEngine:
    def __init__(self, deadline: Deadline, fire_after: int) -> None:
        self.deadline, self.fire_after, self.aborted = deadline, fire_after, []
        self.events = [TokenEvent(0, "Hel"), TokenEvent(1, "lo", finish_reason="length")]

    def submit(self, prompt_ids, params, request_id):
        return RacingHandle(request_id, self.events, self.deadline, self.fire_after)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


class ListStore:
    def __init__(self) -> None:
        self.rows: list[tuple] = []

    def record_response(self, *row) -> None:
        self.rows.append(row)


def run(fire_after: int, stream: bool):
    """(the answer or the exception, the feedback rows, the aborted ids) of a one-choice request whose deadline
    fires after `fire_after` of its two events (the second is final)."""
    deadline, store = Deadline(), ListStore()
    state = SimpleNamespace(
        settings=SimpleNamespace(request_timeout_s=5.0), metrics=ServerMetrics(),
        safety=None, feedback=store, cache=None,
    )  # fmt: skip
    jobs = [Job(0, [1, 2, 3], "abc", SamplingParams(max_tokens=2))]
    prep = Prepared("completion", "cmpl-1", "m", RacingEngine(deadline, fire_after), jobs, 3)
    prep.stream = stream

    async def answer():
        asyncio.get_running_loop().call_later = deadline.call_later  # the controlled clock
        service = CompletionService(state)
        if stream:
            return "".join([write async for write in service.stream(prep)])
        try:
            return await service.complete(prep)
        except TimeoutError as exc:
            return exc

    return asyncio.run(answer()), store.rows, prep.engine.aborted


def test_a_deadline_after_the_final_event_keeps_a_complete_answer():
    body, rows, aborted = run(fire_after=2, stream=False)
    assert body["choices"][0]["text"] == "Hello"
    assert body["choices"][0]["finish_reason"] == "length"
    assert [r[4] for r in rows] == ["Hello"] and aborted == []  # its feedback row


def test_a_deadline_after_the_final_event_keeps_a_complete_stream():
    out, rows, aborted = run(fire_after=2, stream=True)
    texts = [json.loads(c[6:])["choices"][0]["text"] for c in out.split("\n\n") if "{" in c]
    assert texts == ["Hel", "lo"] and out.endswith(SSE_DONE)
    assert [r[4] for r in rows] == ["Hello"] and aborted == []


@pytest.mark.parametrize("stream", [False, True])
def test_a_deadline_before_the_final_event_is_still_a_timeout(stream):
    out, rows, aborted = run(fire_after=1, stream=stream)
    if stream:
        assert '"code": "timeout"' in out and not out.endswith(SSE_DONE)
    else:
        assert isinstance(out, TimeoutError)
    assert rows == [] and aborted == ["cmpl-1-0"]
