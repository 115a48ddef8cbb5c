"""One completion request, from a validated OpenAI request to engine jobs and back to OpenAI JSON.

The routes in server.py stay thin: they parse, authorize and hand the request here. prepare.py
turns it into jobs (prompt safety, knowledge-base passages, token limits, the cache key); this
module answers a cached request from the response cache, runs the others' jobs through the
engine -- merged into one event stream, aborted together on timeout or disconnect -- and shapes
the answer as a response or SSE chunks. Every choice is recorded in the feedback store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from lmforge.constrain.guide import GUIDE_WARM_SECONDS
from lmforge.errors import InputError
from lmforge.serve.api_error import model_not_found
from lmforge.serve.engine import EngineClosed, QueueFull
from lmforge.serve.handle import NO_TOKEN
from lmforge.serve.lora_adapters import AdapterNotServed
from lmforge.serve.prepare import Job, Prepared, RequestPreparer
from lmforge.serve.protocol import APIError, ChatRequest, CompletionRequest, now, usage
from lmforge.serve.safety import StreamRedactor
from lmforge.serve.tools import ToolStream, calls_tools, message_text, renew_call_ids

log = logging.getLogger(__name__)

SSE_DONE = "data: [DONE]\n\n"  # OpenAI's end of a stream: nothing is written after it


class CompletionService:
    """Runs completion and chat requests against the app's engines and stores."""

    def __init__(self, state: Any) -> None:
        self.state = state  # server.ServeState: engines, cache, safety, kb, feedback, metrics
        self.preparer = RequestPreparer(state)

    async def prepare_completion(self, req: CompletionRequest) -> Prepared:
        """The /v1/completions request, ready to run (prepare.py)."""
        await self._compile_guide(req)
        return await self.preparer.prepare_completion(req)

    async def prepare_chat(self, req: ChatRequest) -> Prepared:
        """The /v1/chat/completions request, ready to run (prepare.py)."""
        await self._compile_guide(req)
        return await self.preparer.prepare_chat(req)

    async def _compile_guide(self, req: ChatRequest | CompletionRequest) -> None:
        """Compiles a structured-output request's constraint off the event loop: the first one
        for a model builds its vocabulary's byte trie (seconds for a 50k vocabulary; see
        docs/benchmarks.md), a new constraint computes its first masks (GUIDE_WARM_SECONDS, so
        the engine's thread, which runs every request's step, does not), and prepare.py then
        finds the guide cached."""
        if req.asks_constraint:
            files = self.preparer.engine_for(req.model).files
            await asyncio.to_thread(req.guide, files, GUIDE_WARM_SECONDS)

    # ---- running ---------------------------------------------------------------------------

    async def events(self, prep: Prepared) -> AsyncIterator[tuple[Job, Any]]:
        """Submits every job and yields (job, TokenEvent) as they come, all choices merged."""
        async with aclosing(self.event_batches(prep)) as batches:
            async for batch in batches:
                for job_event in batch:
                    yield job_event

    async def event_batches(self, prep: Prepared) -> AsyncIterator[list[tuple[Job, Any]]]:
        """Submits every job and yields lists of (job, TokenEvent): all that arrived, in order,
        since the last list (streaming writes each list to the client at once).

        Past request_timeout_s it raises TimeoutError. Leaving early (timeout, client gone,
        an error) aborts every job still running. The deadline is a timer that drops a marker
        into the queue, not asyncio.wait_for, which before Python 3.12 can swallow a
        cancellation when the item it waits for is already there (and so never abort).
        """
        engine, handles = prep.engine, []
        queue: asyncio.Queue[tuple[Job | None, Any]] = asyncio.Queue()
        tasks: list[asyncio.Task] = []
        timeout = self.state.settings.request_timeout_s
        timer = asyncio.get_running_loop().call_later(timeout, queue.put_nowait, (None, None))
        try:
            for job in prep.jobs:
                job.request_id = f"{prep.response_id}-{job.index}"
                try:
                    handle = engine.submit(job.prompt_ids, job.params, job.request_id)
                except QueueFull:
                    raise APIError(
                        429, "the server is busy (request queue full); retry shortly",
                        type="rate_limit_error", code="queue_full",
                    ) from None  # fmt: skip
                except EngineClosed:
                    raise APIError(
                        503, "the server is shutting down", type="server_error", code="closed"
                    ) from None
                except AdapterNotServed:  # a LoRA adapter unloaded since the request resolved
                    raise model_not_found(prep.model, self.state.max_context()) from None
                except InputError as exc:
                    raise APIError(400, str(exc), param="max_tokens") from None
                handles.append(handle)
                tasks.append(asyncio.create_task(_pump(handle, job, queue)))
            remaining, ended, late = len(tasks), 0, False
            while remaining:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                batch: list[tuple[Job, Any]] = []
                for job, events in items:
                    if job is None:
                        late = True
                    elif events is None:
                        remaining -= 1
                    else:
                        batch += [(job, event) for event in events]
                        ended += sum(event.finish_reason is not None for event in events)
                if batch:
                    yield batch
                # a deadline that fires once every choice has its final event (their end
                # markers still on the way) is not a timeout: the answer is complete
                if late and ended < len(tasks):
                    raise TimeoutError(f"no complete answer within {timeout}s")
        finally:
            timer.cancel()
            for task in tasks:
                task.cancel()
            for handle in handles:
                if not handle.finished:
                    engine.abort(handle.request_id)
            for handle in handles:
                self._observe(prep.model, handle)
            if handles:
                self.state.metrics.model_requests.labels(prep.model).inc()

    def _observe(self, model: str, handle: Any) -> None:
        m = self.state.metrics
        m.prompt_tokens.labels(model).inc(handle.prompt_tokens)
        m.generated_tokens.labels(model).inc(len(handle.token_times))
        if handle.first_token_at is not None:
            m.ttft.labels(model).observe(handle.first_token_at - handle.submitted_at)
        for a, b in zip(handle.token_times, handle.token_times[1:], strict=False):
            m.itl.labels(model).observe(b - a)

    def _accept(self, prep: Prepared, job: Job, event: Any) -> str:
        """Adds an event to its job; returns the text to emit (after output redaction)."""
        if event.token_id != NO_TOKEN:
            job.tokens += 1
            if job.logprobs is not None:
                token = prep.engine.files.decode([event.token_id], skip_special_tokens=False)
                job.logprobs.add(token, event.logprob, event.top_logprobs)
        if event.finish_reason == "error":
            raise APIError(500, f"generation failed: {event.error}", type="server_error")
        text = event.text
        if job.redactor is not None:
            text = job.redactor.feed(text)
            if event.finish_reason is not None:
                text += job.redactor.flush()
            if job.redactor.refused:
                job.finish_reason = "content_filter"
        job.text.append(text)
        if event.finish_reason is not None and job.finish_reason is None:
            job.finish_reason = event.finish_reason
        return text

    async def complete(self, prep: Prepared) -> dict[str, Any]:
        """The whole (non-streamed) response."""
        if prep.refused:
            return await self._finish(prep, self._refusal(prep))
        cached = self._cache_get(prep)
        if cached is not None:
            return await self._finish(prep, renew_call_ids(cached))
        async with aclosing(self.events(prep)) as events:
            async for job, event in events:
                self._accept(prep, job, event)
        choices = []
        for job in prep.jobs:
            text, reason = "".join(job.text), job.finish_reason
            if self.state.safety is not None:
                verdict = self.state.safety.redact_output(text)
                self.state.metrics.safety.labels("output", verdict.action).inc()
                text = verdict.text
                reason = "content_filter" if verdict.action == "refuse" else reason
            choices.append(self._choice(prep, job, text, reason))
        body = {"choices": choices, "usage": self._usage(prep)}
        if prep.cache_key is not None:
            self.state.cache.put(prep.cache_key, body)
        return await self._finish(prep, body)

    def _cache_get(self, prep: Prepared) -> dict[str, Any] | None:
        if prep.cache_key is None:
            return None
        hit = self.state.cache.get(prep.cache_key)
        self.state.metrics.cache.labels("hit" if hit is not None else "miss").inc()
        return hit

    def _refusal(self, prep: Prepared) -> dict[str, Any]:
        text = self.state.safety.refusal_message
        choices = [self._choice(prep, job, text, "content_filter") for job in prep.jobs]
        return {"choices": choices, "usage": self._usage(prep)}

    def _choice(self, prep: Prepared, job: Job, text: str, reason: str | None) -> dict[str, Any]:
        logprobs = job.logprobs.build() if job.logprobs is not None else None
        if prep.kind == "chat":
            message = {"role": "assistant", "content": text}
            if calls_tools(prep) and reason != "content_filter":
                message, reason = prep.tools.message(text, reason)  # type: ignore[union-attr]
            return {"index": job.index, "message": message, "logprobs": logprobs,
                    "finish_reason": reason}  # fmt: skip
        return {"index": job.index, "text": text, "logprobs": logprobs, "finish_reason": reason}

    def _usage(self, prep: Prepared) -> dict[str, int]:
        return usage(prep.prompt_tokens, sum(j.tokens for j in prep.jobs))

    async def _finish(self, prep: Prepared, body: dict[str, Any]) -> dict[str, Any]:
        """Adds the envelope (id, object, created, model, sources) and records the choices."""
        obj = "chat.completion" if prep.kind == "chat" else "text_completion"
        out = {"id": prep.response_id, "object": obj, "created": now(), "model": prep.model,
               "system_fingerprint": None, **body}  # fmt: skip
        if prep.sources is not None:
            out["sources"] = prep.sources
        texts = [
            message_text(c["message"]) if prep.kind == "chat" else c["text"]
            for c in body["choices"]
        ]
        await self.record(prep, texts, [c["finish_reason"] for c in body["choices"]])
        return out

    async def record(self, prep: Prepared, texts: list[str], reasons: list[str | None]) -> None:
        """One feedback row per choice: the response id for choice 0, "<id>-<i>" after; its
        params carry the finish_reason (the export leaves out tool calls cut by max_tokens)."""
        store = self.state.feedback
        if store is None:
            return
        rows = []
        for job, text, reason in zip(prep.jobs, texts, reasons, strict=True):
            rid = prep.response_id if job.index == 0 else f"{prep.response_id}-{job.index}"
            params = {**dataclasses.asdict(job.params), "finish_reason": reason}
            if prep.tools is not None:
                params.update(prep.tools.record())
            rows.append((rid, prep.model, job.prompt_text, prep.messages, text, params))

        def write() -> None:
            for row in rows:
                store.record_response(*row)

        try:
            await asyncio.to_thread(write)
            self.state.metrics.feedback.labels("response").inc(len(rows))
        except Exception:  # the answer matters more than its record; say so in the log
            log.exception("could not record response %s in the feedback store", prep.response_id)

    # ---- streaming -------------------------------------------------------------------------

    async def stream(self, prep: Prepared) -> AsyncIterator[str]:
        """SSE writes: OpenAI chunks, an optional usage chunk, then [DONE].

        Each string is one write to the client. The events that arrived together share one (the
        first one also carries the opening chunk: chat's role, a completion's sources); the
        stream's end -- the last events, the usage chunk and [DONE] -- is a single write
        (SSE_DONE ends it), sent once the choices are in the feedback store, so a client that
        rates the answer as soon as it has [DONE] finds it there."""
        sse = StreamChunks(prep)
        out = sse.opening()  # SSE chunks not written yet
        if prep.refused:
            text = self.state.safety.refusal_message
            out += [sse.chunk([sse.piece(job, text, "content_filter")]) for job in prep.jobs]
            await self.record(prep, [text] * len(prep.jobs), ["content_filter"] * len(prep.jobs))
        else:
            for job in prep.jobs:
                if self.state.safety is not None:
                    job.redactor = StreamRedactor(self.state.safety)
                if calls_tools(prep):
                    job.tool_stream = ToolStream(prep.tools)  # type: ignore[arg-type]
            sent = {job.index: 0 for job in prep.jobs}
            ended = 0  # choices whose final event has arrived
            try:
                async with aclosing(self.event_batches(prep)) as batches:
                    async for batch in batches:
                        for job, event in batch:
                            ended += event.finish_reason is not None
                            part = self._stream_part(prep, job, event, sent)
                            if part is not None:
                                out += [sse.chunk([piece]) for piece in sse.pieces(job, *part)]
                        if out and ended < len(prep.jobs):  # the last ones wait for the end
                            yield "".join(out)  # one write (one socket send) for all of them
                            out.clear()
            except TimeoutError:
                err = APIError(504, "the request timed out", type="timeout", code="timeout")
            except APIError as exc:
                err = exc
            except Exception as exc:  # a bug: as a non-streamed answer's, an error body, not a
                # cut connection that loses the chunks held back for the end
                log.exception("stream %s failed", prep.response_id)
                err = APIError(500, f"internal error: {exc}", type="server_error")
            else:
                err = None
            if err is not None:  # the chunks before it, then the error; no [DONE]
                yield "".join(out) + f"data: {json.dumps(err.body())}\n\n"
                return
            for job in prep.jobs:
                if job.redactor is not None:
                    self.state.metrics.safety.labels("output", job.redactor.verdict).inc()
            done = [self._streamed(prep, job) for job in prep.jobs]
            await self.record(prep, [text for text, _ in done], [reason for _, reason in done])
        if prep.include_usage:
            out.append(sse.chunk([], usage=self._usage(prep)))
        yield "".join(out) + SSE_DONE

    @staticmethod
    def _streamed(prep: Prepared, job: Job) -> tuple[str, str | None]:
        """A streamed choice's text as record() keeps it (tool calls: message_text) and its
        finish_reason as the stream gave it."""
        text = "".join(job.text)
        if job.tool_stream is None or job.finish_reason == "content_filter":
            return text, job.finish_reason
        message, reason = prep.tools.message(text, job.finish_reason)  # type: ignore[union-attr]
        return message_text(message), reason

    def _stream_part(
        self, prep: Prepared, job: Job, event: Any, sent: dict[int, int]
    ) -> tuple[str, str | None, Any] | None:
        """What one event adds to its choice's stream: (text, finish_reason, logprobs since
        `sent[job.index]`), or None when it adds nothing (text held back, a refused choice)."""
        if job.finish_reason == "content_filter":
            return None  # refused output: nothing more from this choice
        text = self._accept(prep, job, event)
        reason = job.finish_reason if event.finish_reason else None
        if reason is None and job.finish_reason == "content_filter":
            reason = "content_filter"
            prep.engine.abort(job.request_id)  # nothing more of it is sent: stop decoding it
        lp = None
        if job.logprobs is not None:
            lp = job.logprobs.build(sent[job.index])
            sent[job.index] = len(job.logprobs.tokens)
        return (text, reason, lp) if text or reason or lp else None


class StreamChunks:
    """The SSE chunks of one streamed response: OpenAI's envelope around each choice's piece."""

    def __init__(self, prep: Prepared) -> None:
        self.prep = prep
        self.object = "chat.completion.chunk" if prep.kind == "chat" else "text_completion"
        self.created = now()

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        prep = self.prep
        body = {"id": prep.response_id, "object": self.object, "created": self.created,
                "model": prep.model, "system_fingerprint": None, "choices": choices, **extra}  # fmt: skip
        if prep.include_usage and "usage" not in extra:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    def piece(
        self, job: Job, text: str, reason: str | None, lp: Any = None, delta: Any = None
    ) -> dict[str, Any]:
        if self.prep.kind == "chat":
            if delta is None:
                delta = {"content": text} if text or reason is None else {}
            return {"index": job.index, "delta": delta, "logprobs": lp, "finish_reason": reason}
        return {"index": job.index, "text": text, "logprobs": lp, "finish_reason": reason}

    def pieces(self, job: Job, text: str, reason: str | None, lp: Any) -> list[dict[str, Any]]:
        """One event's choice pieces: one, or, for an answer that may call tools, one per delta
        of its ToolStream (content, a call's opening, argument pieces), the logprobs on the
        first and the finish_reason on the last; none when the deltas wait (and no lp)."""
        stream = job.tool_stream
        if stream is None or reason == "content_filter":
            return [self.piece(job, text, reason, lp)]
        deltas = stream.feed(text)
        if reason is not None:
            more, reason = stream.end(reason)
            deltas += more
        if not deltas and (reason is not None or lp):
            deltas = [{}]
        last = len(deltas) - 1
        return [
            self.piece(job, "", reason if i == last else None, lp if i == 0 else None, delta)
            for i, delta in enumerate(deltas)
        ]

    def opening(self) -> list[str]:
        """Chat's first chunk names the role; a completion with sources (a seq2seq model trained
        with passages) opens every choice with no text yet. Either carries the sources there.
        It leaves in the first tokens' write (the headers have told the client it is on)."""
        prep = self.prep
        if prep.kind != "chat" and prep.sources is None:
            return []
        extra = {"sources": prep.sources} if prep.sources is not None else {}
        opening = [self.piece(j, "", None) for j in prep.jobs]
        if prep.kind == "chat":
            calls_only = prep.tools is not None and prep.tools.guided_functions
            content = None if calls_only else ""  # an answer that is calls has no content
            opening = [{**p, "delta": {"role": "assistant", "content": content}} for p in opening]
        return [self.chunk(opening, **extra)]


async def _pump(handle: Any, job: Job, queue: asyncio.Queue) -> None:
    """Moves one handle's events into the shared queue, those of one wake-up as one item;
    None marks its end."""
    try:
        async for events in handle.batches():
            queue.put_nowait((job, events))
    finally:
        queue.put_nowait((job, None))
