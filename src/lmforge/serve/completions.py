"""One completion request, from a validated OpenAI request to engine jobs and back to OpenAI JSON.

The routes in server.py stay thin: they parse, authorize and hand the request here. This module
turns a request into jobs (one per prompt and choice: `n > 1` is n submissions with seeds seed+i),
applies the safety policy to the prompt, the knowledge base to chat messages (and to the text
prompts of a seq2seq model trained with passages), the response cache to deterministic requests,
then runs the jobs through the engine -- merged into one event stream, aborted together on
timeout or disconnect -- and shapes the answer as a response or SSE chunks.
Every choice is recorded in the feedback store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from lmforge.errors import InputError
from lmforge.serve.cache import cache_key
from lmforge.serve.engine import EngineClosed, QueueFull, SamplingParams
from lmforge.serve.handle import NO_TOKEN
from lmforge.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    LogprobsBuilder,
    new_id,
    now,
    usage,
)
from lmforge.serve.retrieval import Passage, augment_messages
from lmforge.serve.safety import StreamRedactor

log = logging.getLogger(__name__)

KB_PASSAGES = 3  # passages a chat gets, unless its model was trained with another number


@dataclass
class Job:
    """One choice: a prompt and its params, submitted to the engine as request_id."""

    index: int
    prompt_ids: list[int]
    prompt_text: str
    params: Any  # engine.SamplingParams
    request_id: str = ""
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: LogprobsBuilder | None = None
    redactor: Any = None  # safety.StreamRedactor for this choice's output


@dataclass
class Prepared:
    """A request ready to run: its jobs and everything the response needs."""

    kind: str  # "completion" | "chat"
    response_id: str
    model: str
    engine: Any
    jobs: list[Job]
    prompt_tokens: int
    messages: list[dict[str, str]] | None = None
    sources: list[dict[str, Any]] | None = None
    refused: bool = False  # the prompt was refused: answer with the policy's refusal text
    cache_key: str | None = None
    stream: bool = False
    include_usage: bool = False


class CompletionService:
    """Runs completion and chat requests against the app's engines and stores."""

    def __init__(self, state: Any) -> None:
        self.state = state  # server.ServeState: engines, cache, safety, kb, feedback, metrics

    # ---- preparing -------------------------------------------------------------------------

    def engine_for(self, model: str) -> Any:
        engine = self.state.engines.get(model)
        if engine is None:
            served = ", ".join(sorted(self.state.engines))
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server serves: {served}",
                param="model",
                code="model_not_found",
            )
        return engine

    async def prepare_completion(self, req: CompletionRequest) -> Prepared:
        if req.echo or req.suffix or (req.best_of or 1) > req.n:
            name = "echo" if req.echo else "suffix" if req.suffix else "best_of"
            raise APIError(400, f"{name} is not supported by this server", param=name)
        engine = self.engine_for(req.model)
        files = engine.files
        # A seq2seq model trained with passages reads a text prompt as chat's user turn: the same
        # source (its passages, score floor, layout) and `sources`, or the engine's warning
        # without a knowledge base. Other prompts (and token prompts, finished sources) go as sent.
        spec, use_kb = getattr(engine, "retrieval", None), self._use_kb(req.kb)
        if req.kb and spec is None:
            raise APIError(400, f"{req.model} was not trained with knowledge-base passages: its "
                           "completion prompts are sent as written (chat adds passages)", param="kb")  # fmt: skip
        refused, jobs, prompt_tokens = False, [], 0
        sources: list[dict[str, Any]] | None = [] if spec is not None and use_kb else None
        for i, prompt in enumerate(req.prompts()):
            ids = None if isinstance(prompt, str) else [int(t) for t in prompt]
            if ids is not None and any(t < 0 or t >= files.vocab_size for t in ids):
                raise APIError(400, "prompt has token ids outside the vocabulary", param="prompt")
            original = prompt if ids is None else files.decode(ids, skip_special_tokens=False)
            text = self._screen_prompt(original)
            if text is None:
                refused, text = True, original
            if ids is None and spec is not None:  # a refusal is not generated: no passages
                if refused or not use_kb:
                    passages = [] if refused else None  # None: the engine warns
                else:
                    passages = await self._passages(engine, text)
                text = engine.source(text, passages)
                if sources is not None:
                    sources += [{**p.to_dict(), "prompt_index": i} for p in passages or []]
            if ids is None or text != original:  # token prompts stay as sent unless redacted
                ids = files.encode(text)
            max_tokens = self._token_limit(engine, len(ids), req.max_tokens, 16, "prompt")
            prompt_tokens += len(ids)
            jobs += self._jobs(req, len(jobs), ids, text, max_tokens, req.logprobs)
        prep = Prepared(
            "completion", new_id("cmpl"), req.model, engine, jobs, prompt_tokens, sources=sources,
            refused=refused, stream=req.stream, include_usage=req.include_usage,
        )  # fmt: skip
        self._set_cache_key(prep, req)
        return prep

    async def prepare_chat(self, req: ChatRequest) -> Prepared:
        engine = self.engine_for(req.model)
        messages = req.plain_messages()
        refused = False
        for m in messages:
            if m["role"] != "assistant":  # the model's own turns are not the user's prompt
                screened = self._screen_prompt(m["content"])
                refused |= screened is None
                m["content"] = m["content"] if screened is None else screened
        sources = None
        passages = [] if refused else None  # None: no knowledge base (a refusal is not generated)
        if self._use_kb(req.kb) and not refused:
            query = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
            passages = await self._passages(engine, query) if query else []
            sources = [p.to_dict() for p in passages]
            messages = augment_messages(messages, passages)
        try:
            if hasattr(engine, "render_chat"):  # seq2seq: the user turn (+ its passages)
                text = engine.render_chat(messages, passages=passages)
            else:
                text = engine.files.render_chat(messages, add_generation_prompt=True)
        except Exception as exc:  # a template may refuse a conversation (e.g. role order)
            raise APIError(
                400, f"the chat template rejected the messages: {exc}", param="messages"
            ) from None
        ids = engine.files.encode(text)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = self._token_limit(engine, len(ids), req.token_limit, None, "messages")
        prep = Prepared(
            "chat", new_id("chatcmpl"), req.model, engine,
            self._jobs(req, 0, ids, text, max_tokens, logprobs), len(ids),
            messages=messages, sources=sources, refused=refused, stream=req.stream,
            include_usage=req.include_usage,
        )  # fmt: skip
        self._set_cache_key(prep, req)
        return prep

    def _use_kb(self, asked: bool | None) -> bool:
        """Whether a request gets knowledge-base passages: when the server has a knowledge base,
        unless the request's `kb` is false; `kb: true` without one is a 400."""
        if asked and self.state.kb is None:
            raise APIError(
                400, "this server has no knowledge base (start it with --kb)", param="kb"
            )
        return self.state.kb is not None and asked is not False

    async def _passages(self, engine: Any, query: str) -> list[Passage]:
        """The knowledge base's passages for a user turn: as the model's RetrievalSpec finds them
        (its k and score floor) when it was trained with passages, else the top KB_PASSAGES."""
        spec = getattr(engine, "retrieval", None)  # a seq2seq model trained with passages
        if spec is not None:
            return await asyncio.to_thread(spec.search, self.state.kb, query)
        return await asyncio.to_thread(self.state.kb.search, query, KB_PASSAGES)

    def _screen_prompt(self, text: str) -> str | None:
        """The prompt after the safety policy: redacted text, or None when refused."""
        policy = self.state.safety
        if policy is None:
            return text
        verdict = policy.check_prompt(text)
        self.state.metrics.safety.labels("prompt", verdict.action).inc()
        return None if verdict.action == "refuse" else verdict.text

    @staticmethod
    def _token_limit(
        engine: Any, prompt_len: int, asked: int | None, default: int | None, prompt_param: str
    ) -> int:
        """max_tokens, checked against the room the engine leaves after the prompt (the default
        fills it), so a request the engine would refuse is a 400 naming the field."""
        if prompt_len == 0:
            raise APIError(400, "the prompt is empty", param=prompt_param)
        room = engine.token_room(prompt_len)
        if room < 1:
            raise APIError(
                400,
                f"the {prompt_len}-token prompt leaves no room for an answer in the model's "
                f"context window of {engine.max_context} tokens; shorten it",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if asked is None:
            return min(default or room, room)
        if asked > room:
            raise APIError(
                400,
                f"max_tokens={asked} does not fit: the model's context window of "
                f"{engine.max_context} tokens leaves {room} for an answer to this "
                f"{prompt_len}-token prompt; ask for at most {room}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return asked

    def _jobs(
        self, req: Any, start: int, ids: list[int], text: str, max_tokens: int, logprobs: int | None
    ) -> list[Job]:
        jobs = []
        for i in range(req.n):
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=req.top_k or 0,
                stop=tuple(req.stop_list),
                seed=None if req.seed is None else req.seed + i,
                logprobs=logprobs,
                ignore_eos=req.ignore_eos,
            )
            try:
                params.validate()
            except InputError as exc:
                raise APIError(400, str(exc), param=str(exc).split(" ", 1)[0]) from None
            job = Job(start + i, ids, text, params)
            if logprobs is not None:
                job.logprobs = LogprobsBuilder(chat=isinstance(req, ChatRequest))
            jobs.append(job)
        return jobs

    def _set_cache_key(self, prep: Prepared, req: Any) -> None:
        if self.state.cache is None or prep.refused or prep.stream:
            return
        model = self.state.model_ids[prep.model]  # name@content hash: new weights, new keys
        key = cache_key(model, prep.jobs[0].prompt_ids, prep.jobs[0].params)
        if key is not None:  # n, several prompts and the kind are part of what is asked too
            extra = json.dumps([prep.kind, [j.prompt_ids for j in prep.jobs], prep.sources])
            prep.cache_key = f"{key}:{hashlib.sha256(extra.encode()).hexdigest()[:16]}"

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
                except InputError as exc:
                    raise APIError(400, str(exc), param="max_tokens") from None
                handles.append(handle)
                tasks.append(asyncio.create_task(_pump(handle, job, queue)))
            remaining = len(tasks)
            while remaining:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                batch: list[tuple[Job, Any]] = []
                for job, events in items:
                    if job is None:
                        if batch:
                            yield batch
                        raise TimeoutError(f"no complete answer within {timeout}s")
                    if events is None:
                        remaining -= 1
                        continue
                    batch += [(job, event) for event in events]
                if batch:
                    yield batch
        finally:
            timer.cancel()
            for task in tasks:
                task.cancel()
            for handle in handles:
                if not handle.finished:
                    engine.abort(handle.request_id)
            for handle in handles:
                self._observe(prep.model, handle)

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
            return await self._finish(prep, cached)
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
            c["message"]["content"] if prep.kind == "chat" else c["text"] for c in body["choices"]
        ]
        await self.record(prep, texts)
        return out

    async def record(self, prep: Prepared, texts: list[str]) -> None:
        """One feedback row per choice: the response id for choice 0, "<id>-<i>" after."""
        store = self.state.feedback
        if store is None:
            return
        rows = []
        for job, text in zip(prep.jobs, texts, strict=True):
            rid = prep.response_id if job.index == 0 else f"{prep.response_id}-{job.index}"
            params = dataclasses.asdict(job.params)
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
        """SSE lines: OpenAI chunks, an optional usage chunk, then [DONE]."""
        obj = "chat.completion.chunk" if prep.kind == "chat" else "text_completion"
        created = now()

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            body = {"id": prep.response_id, "object": obj, "created": created,
                    "model": prep.model, "system_fingerprint": None, "choices": choices, **extra}  # fmt: skip
            if prep.include_usage and "usage" not in extra:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        def piece(job: Job, text: str, reason: str | None, lp: Any = None) -> dict[str, Any]:
            if prep.kind == "chat":
                delta = {"content": text} if text or reason is None else {}
                return {"index": job.index, "delta": delta, "logprobs": lp, "finish_reason": reason}
            return {"index": job.index, "text": text, "logprobs": lp, "finish_reason": reason}

        # Chat's first chunk names the role; a completion with sources (a seq2seq model trained
        # with passages) opens every choice with no text yet. Either carries the sources there.
        if prep.kind == "chat" or prep.sources is not None:
            extra = {"sources": prep.sources} if prep.sources is not None else {}
            opening = [piece(j, "", None) for j in prep.jobs]
            if prep.kind == "chat":
                opening = [{**p, "delta": {"role": "assistant", "content": ""}} for p in opening]
            yield chunk(opening, **extra)
        if prep.refused:
            text = self.state.safety.refusal_message
            for job in prep.jobs:
                yield chunk([piece(job, text, "content_filter")])
            await self.record(prep, [text] * len(prep.jobs))
        else:
            if self.state.safety is not None:
                for job in prep.jobs:
                    job.redactor = StreamRedactor(self.state.safety)
            sent = {job.index: 0 for job in prep.jobs}
            out: list[str] = []  # the SSE chunks of the events that arrived together
            try:
                async with aclosing(self.event_batches(prep)) as batches:
                    async for batch in batches:
                        for job, event in batch:
                            part = self._stream_part(prep, job, event, sent)
                            if part is not None:
                                out.append(chunk([piece(job, *part)]))
                        if out:  # one write (one socket send) for all of them
                            yield "".join(out)
                            out.clear()
            except TimeoutError:
                err = APIError(504, "the request timed out", type="timeout", code="timeout")
                yield "".join(out) + f"data: {json.dumps(err.body())}\n\n"
                return
            except APIError as exc:
                yield "".join(out) + f"data: {json.dumps(exc.body())}\n\n"
                return
            for job in prep.jobs:
                if job.redactor is not None:
                    self.state.metrics.safety.labels("output", job.redactor.verdict).inc()
            await self.record(prep, ["".join(j.text) for j in prep.jobs])
        if prep.include_usage:
            yield chunk([], usage=self._usage(prep))
        yield "data: [DONE]\n\n"

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
        lp = None
        if job.logprobs is not None:
            lp = job.logprobs.build(sent[job.index])
            sent[job.index] = len(job.logprobs.tokens)
        return (text, reason, lp) if text or reason or lp else None


async def _pump(handle: Any, job: Job, queue: asyncio.Queue) -> None:
    """Moves one handle's events into the shared queue, those of one wake-up as one item;
    None marks its end."""
    try:
        async for events in handle.batches():
            queue.put_nowait((job, events))
    finally:
        queue.put_nowait((job, None))
