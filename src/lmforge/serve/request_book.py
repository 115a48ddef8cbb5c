"""The engine's requests by stage, and how each one ends.

A request waits in `waiting` (first come, first admitted), is `active` from its admission to its
final event, and may be asked to abort (`aborts`) while it runs, which the step loop applies at
its next step. `finish` sends a request's final event exactly once and forgets it, whatever ended
it (its last token, an abort, an error). The all-time counts EngineStats reports live here too.
Not locked by itself: the engine calls it under its lock, the one that guards its running batch.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import torch

from lmforge.errors import InputError
from lmforge.serve.detok import TextStream
from lmforge.serve.handle import NO_TOKEN, RequestHandle, TokenEvent
from lmforge.serve.prefix_cache import TokenChain
from lmforge.serve.sampling import SamplingParams

if TYPE_CHECKING:
    from lmforge.serve.row_batch import RowBatch


class Row:
    """A request inside the engine: its params, its text stream, and its place in the batch."""

    def __init__(
        self,
        handle: RequestHandle,
        prompt: list[int],
        params: SamplingParams,
        stops: frozenset,
        adapter: str | None = None,
        adapter_key: str | None = None,
    ) -> None:
        self.handle, self.prompt, self.params, self.stops = handle, prompt, params, stops
        self.adapter = adapter  # the LoRA adapter its forward passes add (None: the base)
        self.stop_list = sorted(stops)  # what the logits rules take, sorted once
        # the tokens its cache holds and their prefix-cache block keys (serve/prefix_cache.py)
        # shared only within a salt and an adapter's weights (adapter_key: name@digest)
        self.chain = TokenChain(prompt, salt=params.cache_salt, adapter=adapter_key or adapter)
        self.generated = 0
        self.pending = -1  # last sampled token, fed at the next decoding step
        self.stream: TextStream | None = None
        self.generator: torch.Generator | None = None
        # what the repetition penalty and logits rules see (the prompt, or a decoder's start,
        # then the answer so far): kept only for rows whose params use them
        self.history: list[int] | None = None
        # where the answer is in its structured-output grammar (serve/guided_rows.py)
        self.guide_state = params.guide.tokens.start if params.guide is not None else None
        # the batch this row was last sampled in: its kept tensors serve the next step as they
        # are, or regrouped when rows join or leave (serve/row_batch.py)
        self.batch: RowBatch | None = None

    @property
    def request_id(self) -> str:
        return self.handle.request_id


class RequestBook:
    """Waiting, active and abort-asked requests, and the counts; every method runs under the
    engine's lock."""

    def __init__(self) -> None:
        self.waiting: deque[Row] = deque()
        self.active: dict[str, Row] = {}  # admitted, not finished
        self.aborts: set[str] = set()
        self.counts = dict(steps=0, prefills=0, prompt_tokens=0, generated_tokens=0, finished=0)

    def queue(self, row: Row) -> None:
        """A new request waits for a batch slot; its id must not be in use."""
        request_id = row.request_id
        if request_id in self.active or any(r.request_id == request_id for r in self.waiting):
            raise InputError(f"request id {request_id!r} is already in use")
        self.waiting.append(row)

    def admit(self, rows: list[Row]) -> None:
        """These requests left the queue for this step's prefill."""
        for row in rows:
            self.active[row.request_id] = row

    def abort(self, request_id: str) -> bool:
        """Ends a waiting request now, or asks the step loop to end an active one (True: the
        loop must be woken)."""
        for row in self.waiting:
            if row.request_id == request_id:
                self.waiting.remove(row)
                self.finish_aborted(row)
                return False
        if request_id in self.active:
            self.aborts.add(request_id)
            return True
        return False

    def abort_all(self) -> None:
        """Aborts the waiting requests now and the active ones at the next step."""
        while self.waiting:
            self.finish_aborted(self.waiting.popleft())
        self.aborts.update(self.active)

    def fail(self, rows: list[Row], exc: BaseException) -> None:
        """Ends these requests with finish_reason "error"."""
        for row in rows:
            self.finish(row, error_event(exc))

    def finish_aborted(self, row: Row) -> None:
        """Ends a request with finish_reason "abort"."""
        self.finish(row, TokenEvent(NO_TOKEN, "", finish_reason="abort"))

    def finish(self, row: Row, event: TokenEvent) -> None:
        """Sends a request's final event and forgets the request."""
        if row.handle.finished:
            return
        self.active.pop(row.request_id, None)
        self.aborts.discard(row.request_id)
        row.batch = None  # its batch refers to it: let both go without waiting for the gc
        self.counts["finished"] += 1
        row.handle.push(event)


def error_event(exc: BaseException) -> TokenEvent:
    """The final event of a request that failed: what went wrong, for the server's 500 body."""
    return TokenEvent(NO_TOKEN, "", finish_reason="error", error=f"{type(exc).__name__}: {exc}")
