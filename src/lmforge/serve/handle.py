"""What a submitted request gives back: a stream of TokenEvents, readable from threads or asyncio.

The engine's step loop runs in its own thread and pushes events; one reader consumes them, either
by plain iteration (blocks on a condition variable) or by async iteration (an asyncio future that
the engine thread resolves through loop.call_soon_threadsafe), so no reader ever polls. An async
reader can also take all the events that arrived since it last ran at once (batches()).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

NO_TOKEN = -1  # token_id of a final event that carries no token (abort, error)


@dataclass
class TokenEvent:
    """One generated token (in order), or a final NO_TOKEN event for an abort or an error."""

    token_id: int
    text: str  # the new text this token adds (held back: partial UTF-8, stop-string prefixes)
    logprob: float | None = None
    top_logprobs: dict[str, float] | None = None
    finish_reason: str | None = None  # on the last event: "stop" | "length" | "abort" | "error"
    error: str | None = None  # with finish_reason "error": what went wrong


@dataclass
class Completion:
    """A finished request, gathered from its events by collect()."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[float] | None  # chosen tokens' logprobs, when asked for
    top_logprobs: list[dict[str, float]] | None
    usage: dict[str, int] = field(default_factory=dict)  # prompt/completion/total_tokens
    error: str | None = None


class RequestHandle:
    """A request's event stream plus its timing (time.perf_counter() values) for metrics."""

    def __init__(self, request_id: str, prompt_tokens: int) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.token_times: list[float] = []  # one per generated token: inter-token latency
        self.finish_reason: str | None = None
        self._events: deque[TokenEvent] = deque()
        self._lock = threading.Condition()
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    def push(self, event: TokenEvent, wakes: WakeBatch | None = None) -> None:
        """Called by the engine thread: queue the event and wake the reader (at once, or with
        the rest of `wakes` when the engine sends it at the end of its step)."""
        now = time.perf_counter()
        with self._lock:
            if self.finished_at is not None:
                return  # nothing after the final event
            if event.token_id != NO_TOKEN:
                self.first_token_at = self.first_token_at or now
                self.token_times.append(now)
            if event.finish_reason is not None:
                self.finished_at, self.finish_reason = now, event.finish_reason
            self._events.append(event)
            self._lock.notify_all()
            waiter, loop = self._waiter, self._loop
            self._waiter = None
        if waiter is not None and loop is not None:
            if wakes is not None:
                wakes.add(loop, waiter)
            else:
                _send(loop, [waiter])

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            with self._lock:
                while not self._events:
                    self._lock.wait()
                event = self._events.popleft()
            yield event
            if event.finish_reason is not None:
                return

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        async for batch in self.batches():
            for event in batch:
                yield event

    async def batches(self) -> AsyncIterator[list[TokenEvent]]:
        """Every event queued by the time the reader runs, one list per wake-up, the final
        event last. A reader that fell behind the engine (a busy event loop) catches up with
        one list, so the server writes the tokens of several steps to the socket at once
        instead of paying a send, and its kernel wake-up of the client, per token."""
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                events = list(self._events)
                self._events.clear()
                if not events:
                    self._loop, self._waiter = loop, loop.create_future()
                    waiter = self._waiter
            if not events:
                await waiter
                continue
            yield events
            if events[-1].finish_reason is not None:
                return


class WakeBatch:
    """The asyncio readers to wake after one engine step, woken together: one
    call_soon_threadsafe per event loop (one self-pipe write, one loop wake-up) instead of one
    per token, so the loop is not woken, and does not take the GIL from the engine thread,
    once for every row of the batch."""

    def __init__(self) -> None:
        self._waiters: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}

    def add(self, loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[None]) -> None:
        self._waiters.setdefault(loop, []).append(waiter)

    def send(self) -> None:
        """Wakes every reader added so far (each once); the batch is empty afterwards."""
        waiters, self._waiters = self._waiters, {}
        for loop, futures in waiters.items():
            _send(loop, futures)


def _send(loop: asyncio.AbstractEventLoop, waiters: list[asyncio.Future[None]]) -> None:
    # RuntimeError: the readers' event loop is closed, nobody is left to wake
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_wake, waiters)


def _wake(waiters: list[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)


def collect(handle: RequestHandle) -> Completion:
    """Reads a handle to the end (blocking): the whole text, ids, logprobs and usage."""
    texts, ids, lps, tops, last = [], [], [], [], None
    for event in handle:
        texts.append(event.text)
        if event.token_id != NO_TOKEN:
            ids.append(event.token_id)
            lps.append(event.logprob)
            tops.append(event.top_logprobs)
        last = event
    wanted = bool(lps) and lps[0] is not None
    usage = {
        "prompt_tokens": handle.prompt_tokens,
        "completion_tokens": len(ids),
        "total_tokens": handle.prompt_tokens + len(ids),
    }
    return Completion(
        text="".join(texts),
        token_ids=ids,
        finish_reason=last.finish_reason if last else None,
        logprobs=lps if wanted else None,
        top_logprobs=tops if wanted else None,
        usage=usage,
        error=last.error if last else None,
    )
