"""The serving engine: continuous batching of generation requests on one Transformer.

Requests join and leave the running batch at every decoding step. A background thread loops:

1. apply aborts; admit waiting requests into the free batch slots (max_batch_size), up to
   max_prefill_tokens prompt tokens a step, so a burst of prompts stalls decoding little; a
   prompt longer than that budget is prefilled alone, one budget-sized chunk per step (the
   model's start_pos + explicit causal mask), with the running batch decoding in between;
2. prefill the newcomers, those of similar length together (left-padded, one forward pass per
   group, each group its own BatchCache; prefill_groups keeps padding under 25% of a pass, since
   a prefill is compute-bound already and padding only adds work); the leading blocks of a
   prompt that the prefix cache holds are copied in, not recomputed (serve/prefix_cache.py, off
   unless prefix_cache_mb); each newcomer samples its first token from the prefill logits and
   the groups' keys/values merge into the running batch's cache in one copy (BatchCache.merge);
3. one decoding step for the whole running batch: every row feeds its last token at start_pos=L
   with the batch's pad_mask, so each row keeps its own positions (model.transformer.pad_positions)
   and never attends to another row's padding;
4. each row samples under its own SamplingParams (serve/sampling.py), detokenizes incrementally
   (serve/detok.py) and pushes a TokenEvent to its RequestHandle; finished rows leave the batch
   (index_select) and all-padding leading columns are trimmed, so L stays <= block_size.

This module is the public API (start/submit/abort/stats/shutdown) and the loop that orders the
steps under one lock; the parts it composes live beside it: the scheduling policy of steps 1-2
(serve/scheduler.py: admit, plan_prefill, prefill_groups), the forward passes of steps 2-3
(serve/causal_step.py, which also says why the batch is one right-aligned cache rather than
fixed slots, with measurements), emission of step 4 (serve/emit.py), the requests' queue,
aborts, final events and counts (serve/request_book.py), and torch's thread count
(serve/engine_threads.py). Throughput (16 concurrent requests 5.9x one at a time through the
engine, 5.1x generate() one at a time, one thread): benchmarks/bench_serve_engine.py.

Failures stay local: an exception while prefilling retries the newcomers one by one and fails
(finish_reason "error") only those that fail alone; one in a decoding step fails the rows of that
step; an exception while emitting a row's token fails that row. The loop keeps serving.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.errors import ConfigError, InputError
from lmforge.model.compiled_decode import use_compiled_decode
from lmforge.serve.batch_cache import BatchCache
from lmforge.serve.causal_step import decode_pass, prefill_pass, warm_up_compiled
from lmforge.serve.chunked_prefill import ChunkedPrefills
from lmforge.serve.detok import TextStream
from lmforge.serve.emit import emit_tokens
from lmforge.serve.engine_threads import configure_threads as _configure_threads
from lmforge.serve.engine_types import EngineClosed, EngineStats, QueueFull
from lmforge.serve.handle import (
    NO_TOKEN,
    Completion,
    RequestHandle,
    TokenEvent,
    WakeBatch,
    collect,
)
from lmforge.serve.model_dir import load_served_model
from lmforge.serve.prefix_cache import PrefixCache
from lmforge.serve.request_book import RequestBook, Row
from lmforge.serve.request_defaults import NO_DEFAULTS, RequestDefaults
from lmforge.serve.sampling import SamplingParams, new_generator
from lmforge.serve.scheduler import admit, plan_prefill, prefill_groups
from lmforge.tokenizer.files import TokenizerFiles
from lmforge.tokenizer.generation import eos_ids, generation_config

# The engine contract in one import (the handle and sampling types live in their own modules).
__all__ = [
    "NO_TOKEN", "Completion", "Engine", "EngineClosed", "EngineStats", "QueueFull",
    "RequestHandle", "SamplingParams", "TokenEvent", "collect", "prefill_groups",
]  # fmt: skip

log = logging.getLogger(__name__)


class Engine:
    """Continuous-batching generation on one model; submit() from any thread."""

    def __init__(
        self,
        model: nn.Module,
        files: TokenizerFiles,
        *,
        name: str,
        max_batch_size: int = 32,
        max_queue: int = 256,
        generation_config: dict[str, Any] | None = None,
        max_prefill_tokens: int = 2048,
        threads: int | None = None,
        compile: str = "off",
        request_defaults: RequestDefaults = NO_DEFAULTS,
        prefix_cache_mb: float = 0,
    ) -> None:
        if max_batch_size < 1 or max_queue < 0 or max_prefill_tokens < 1:
            raise InputError(
                "max_batch_size and max_prefill_tokens must be >= 1 and max_queue >= 0, got "
                f"{max_batch_size}, {max_prefill_tokens}, {max_queue}"
            )
        _configure_threads(threads)
        self.model = model.eval()
        self.files = files
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens  # prompt tokens prefilled per step
        self.max_context: int = model.config.block_size
        self.vocab_size: int = model.config.vocab_size
        self.device = next(model.parameters()).device
        # decoding steps through model/compiled_decode.py (off | on | auto: CUDA only)
        self.compiled_decode = use_compiled_decode(compile, self.device)
        # the request fields a request leaves unset (serve/request_defaults.py; read by from_dir)
        self.request_defaults = request_defaults
        gen = generation_config if generation_config is not None else _default_gen(files)
        self.model_stops = frozenset(eos_ids(gen))
        self._lock = threading.Condition()
        self._book = RequestBook()  # waiting, active and abort-asked requests; the counts
        self._running: list[Row] = []
        self._cache: BatchCache | None = None
        # prompts' leading blocks' keys/values, reused by later prompts (serve/prefix_cache.py)
        self._prefix = PrefixCache.for_model(model, prefix_cache_mb)
        # prompts over the budget, prefilled a chunk a step
        self._chunked = ChunkedPrefills(self.model, self.device, max_prefill_tokens, self._prefix)
        self._closed = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def _counts(self) -> dict[str, int]:
        """(lock held) The all-time counts EngineStats reports (Seq2SeqEngine counts its steps)."""
        return self._book.counts

    @classmethod
    def from_dir(
        cls,
        model_dir: Path | str,
        *,
        name: str | None = None,
        device: str = "auto",
        dtype: torch.dtype | None = None,
        checkpoint_defaults: bool = True,
        **kw: Any,
    ) -> Engine:
        """An engine for a model directory (lmforge export or HF checkpoint), not yet started;
        device and dtype as serve/model_dir.py resolves them. checkpoint_defaults: the
        checkpoint's generation_config fills the fields a request leaves unset (vLLM's
        --generation-config auto); False keeps the server's own defaults (none)."""
        served = load_served_model(
            model_dir, name=name, device=device, dtype=dtype, request_defaults=checkpoint_defaults
        )
        return cls(
            served.model,
            served.files,
            name=served.name,
            generation_config=served.generation_config,
            request_defaults=served.request_defaults,
            **kw,
        )

    # -- the API the server calls -----------------------------------------------------------

    def start(self) -> None:
        """Starts the step loop in a background (daemon) thread. With compiled_decode the
        decoding step compiles first, outside the lock (tens of seconds): submit() queues,
        stats() and shutdown() answer meanwhile."""
        if not self._startable():
            return
        if self.compiled_decode:
            try:
                warm_up_compiled(self.model, self.device)
            except Exception as exc:
                raise ConfigError(
                    f"engine {self.name!r}: compiling the decoding step failed; serve with "
                    f"compile off (--compile off) or mend the cause: {exc}"
                ) from exc
        with self._lock:
            if not self._startable():  # shut down, or started elsewhere, while compiling
                return
            self._thread = threading.Thread(target=self._loop, name=f"engine-{self.name}")
            self._thread.daemon = True
            self._thread.start()

    def _startable(self) -> bool:
        """Whether start() has a loop to start: False once started; EngineClosed once shut."""
        with self._lock:
            if self._closed:
                raise EngineClosed(f"engine {self.name!r} is shut down; create a new one")
            return self._thread is None

    def submit(
        self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str
    ) -> RequestHandle:
        """Queues a request; its events arrive on the returned handle."""
        params.validate()
        prompt = list(prompt_ids)
        self._check_prompt(prompt, params)
        stops = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else self.model_stops
        )
        handle = RequestHandle(request_id, len(prompt))
        with self._lock:
            if self._closed:
                raise EngineClosed(f"engine {self.name!r} is shutting down; no new requests")
            if len(self._book.waiting) >= self.max_queue:
                raise QueueFull(
                    f"engine {self.name!r}: {len(self._book.waiting)} requests already waiting "
                    f"(max_queue {self.max_queue}); retry later"
                )
            self._book.queue(Row(handle, prompt, params, stops))
            self._lock.notify_all()
        return handle

    def abort(self, request_id: str) -> None:
        """Ends a request (finish_reason "abort"): at once if waiting, else at the next step."""
        with self._lock:
            if self._book.abort(request_id):
                self._lock.notify_all()

    def stats(self) -> EngineStats:
        with self._lock:
            tokens, capacity = self._cache_usage()
            return EngineStats(
                queue_depth=len(self._book.waiting),
                running=len(self._running),
                max_batch_size=self.max_batch_size,
                cache_tokens=tokens,
                cache_capacity=capacity,
                prefix=self._prefix.stats(),
                **self._counts,
            )

    def _cache_usage(self) -> tuple[int, int]:
        """(lock held) KV positions the running batch spans, and those allocated."""
        cache = self._cache
        if cache is None:
            return 0, 0
        return len(self._running) * cache.length, cache.rows * cache.capacity

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuses new requests; drain=True finishes the in-flight ones first, else aborts them.

        With a timeout, requests still unfinished when it expires are aborted.
        """
        with self._lock:
            self._closed = True
            self._stopping = True
            if not drain or self._thread is None:
                self._book.abort_all()
            self._lock.notify_all()
            thread = self._thread
        if thread is None:
            return
        thread.join(timeout)
        if thread.is_alive():
            with self._lock:
                self._book.abort_all()
                self._lock.notify_all()
            thread.join()

    # -- the step loop ------------------------------------------------------------------------

    def _check_ids(self, prompt: list[int]) -> None:
        if not prompt:
            raise InputError("prompt is empty: give at least one token")
        if not all(type(t) is int and 0 <= t < self.vocab_size for t in prompt):
            raise InputError(f"prompt token ids must be ints in [0, {self.vocab_size})")

    def token_room(self, prompt_len: int) -> int:
        """The most tokens an answer to a prompt of `prompt_len` tokens can have: what the
        context leaves after the prompt (negative when the prompt alone does not fit). The one
        rule behind submit's check and the server's max_tokens default and 400."""
        return self.max_context - prompt_len

    def _check_prompt(self, prompt: list[int], params: SamplingParams) -> None:
        self._check_ids(prompt)
        if params.max_tokens > self.token_room(len(prompt)):
            raise InputError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"model's context of {self.max_context} tokens; shorten the prompt or lower "
                "max_tokens"
            )

    def _loop(self) -> None:
        book = self._book
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not (book.waiting or self._running or self._chunked or self._stopping):
                        self._lock.wait()
                    self._apply_aborts()
                    if self._stopping and not (book.waiting or self._running or self._chunked):
                        return
                    free = self.max_batch_size - len(self._running)
                    joining = [] if self._chunked else admit(
                        book.waiting, free, self.max_prefill_tokens, self._prefix
                    )  # fmt: skip
                    book.admit(joining)
                try:
                    if self._chunked:
                        self._prefill_chunk()
                    elif joining:
                        self._prefill(joining)
                    if self._running:
                        self._decode()
                except Exception as exc:  # an engine bug: fail the batch rather than hang readers
                    log.exception("engine step failed")
                    self._fail([*self._running, *joining, *self._chunked], exc)
                    with self._lock:
                        self._running, self._cache = [], None
                        self._chunked.clear()

    def _apply_aborts(self) -> None:
        """(lock held) Drops aborted rows from the running batch."""
        book = self._book
        if not book.aborts:
            return
        keep = [i for i, r in enumerate(self._running) if r.request_id not in book.aborts]
        for row in self._running:
            if row.request_id in book.aborts:
                book.finish_aborted(row)
        for row in self._chunked.remove(book.aborts):
            log.debug("request %s aborted during its chunked prefill", row.request_id)
            book.finish_aborted(row)
        book.aborts &= set(book.active)  # those still being admitted wait for the next step
        self._keep(keep)

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self._running):
            return
        self._running = [self._running[i] for i in keep]
        if self._cache is not None:
            self._cache.keep(keep)
        if not self._running:
            self._cache = None

    def _prefill(self, rows: list[Row]) -> None:
        """Prefills newcomers in groups of similar length, then merges them into the batch;
        prompts over the budget wait in _chunked, prefilled a chunk a step."""
        todo = [r.prompt[self._prefix.peek(r.prompt) :] for r in rows]  # what is not cached
        whole, chunked = plan_prefill(todo, self.max_prefill_tokens)
        with self._prefix.holding(r.prompt for r in rows):  # each pass finds what todo counted
            joined = [j for group in whole for j in self._prefill_group([rows[i] for i in group])]
        self._chunked.extend(rows[i] for i in chunked)
        self._join(joined)

    def _join(self, joined: list[tuple[list[Row], BatchCache]]) -> None:
        """Merges prefilled rows (and their caches) into the running batch."""
        if not joined:
            return
        caches = [cache for _, cache in joined]
        if self._cache is None:
            self._cache = caches.pop(0)
        if caches:
            self._cache.merge(caches)
        with self._lock:
            self._running += [row for group_rows, _ in joined for row in group_rows]

    def _prefill_group(self, rows: list[Row]) -> list[tuple[list[Row], BatchCache]]:
        """One prefill pass; if it fails, one pass per row, failing only the rows that fail.
        Returns the rows that continue, with their cache."""
        try:
            cache, logits = self._prefill_forward(rows)
        except Exception as exc:  # any failure must stay inside these requests
            if len(rows) > 1:
                return [joined for row in rows for joined in self._prefill_group([row])]
            log.exception("prefill of request %s failed", rows[0].request_id)
            self._fail(rows, exc)
            return []
        with self._lock:
            self._counts["prefills"] += 1
            self._counts["prompt_tokens"] += sum(len(r.prompt) for r in rows)
        keep = self._emit(rows, logits)
        if not keep:
            return []
        cache.keep(keep)
        return [([rows[i] for i in keep], cache)]

    def _prefill_chunk(self) -> None:
        """The next max_prefill_tokens of the first over-budget prompt; at its end the request
        samples its first token and joins the batch. Running rows decode between chunks."""
        row = self._chunked.rows[0]
        try:
            prefilled = self._chunked.step(self._start)
            if prefilled is not None:  # the row has left _chunked: a failure must name it here
                self._prefix.store_batch([row.prompt], prefilled[0])
        except Exception as exc:  # this request alone fails
            log.exception("prefill of request %s failed", row.request_id)
            self._fail([row], exc)
            return
        if prefilled is None:
            return
        cache, logits = prefilled
        with self._lock:
            self._counts["prefills"] += 1
            self._counts["prompt_tokens"] += len(row.prompt)
        try:
            if self._emit([row], logits):
                self._join([([row], cache)])
        except Exception as exc:  # it left _chunked: the loop's handler would not see it
            self._fail([row], exc)
            raise

    def _start(self, row: Row) -> None:
        """A request's text stream, (when sampling) its generator and (when a penalty or a rule
        needs it) its history, at its prefill."""
        row.stream = TextStream(self.files.tokenizer, row.params.stop)
        if not row.params.greedy:
            row.generator = new_generator(row.params.seed, self.device)
        if row.params.sees_history:
            row.history = self._history_start(row)

    def _history_start(self, row: Row) -> list[int]:
        """The tokens before the answer that the rules count: a causal model's prompt."""
        return list(row.prompt)

    def _prefill_forward(self, rows: list[Row]) -> tuple[BatchCache, Tensor]:
        """The newcomers' prompts in one left-padded forward pass (from their prefix cache hits
        on): their cache and next logits."""
        prompts = [r.prompt for r in rows]
        hits = [self._prefix.lookup(p) for p in prompts]
        cache, logits = prefill_pass(self.model, prompts, self.device, hits)
        self._prefix.store_batch(prompts, cache)
        for row in rows:
            self._start(row)
        return cache, logits

    def _decode(self) -> None:
        """One decoding step for the whole running batch."""
        rows, cache = self._running, self._cache
        assert cache is not None
        try:
            tokens = [r.pending for r in rows]
            logits = decode_pass(self.model, cache, tokens, self.device, self.compiled_decode)
        except Exception as exc:  # fail this step's rows, keep serving
            log.exception("decoding step failed for %d requests", len(rows))
            self._fail(rows, exc)
            with self._lock:
                self._running, self._cache = [], None
            return
        with self._lock:
            self._counts["steps"] += 1
        self._emit(rows, logits, leave=self._keep)

    def _emit(
        self, rows: list[Row], logits: Tensor, leave: Callable[[list[int]], None] | None = None
    ) -> list[int]:
        """Samples each row's next token and sends its event; returns the rows that continue.

        leave(keep) drops the others from the running batch, under the lock and before their
        final events go out, so a reader that saw its request end never finds it still running.
        The rows' asyncio readers are woken once for the whole step (WakeBatch), not per row.
        """
        wakes = WakeBatch()
        try:
            emitted = emit_tokens(rows, logits, self.files, wakes)
            with self._lock:
                if leave is not None:
                    leave(emitted.keep)
                for row, event in emitted.finals:
                    self._book.finish(row, event)
                self._counts["generated_tokens"] += emitted.sampled
            return emitted.keep
        finally:
            wakes.send()

    def _fail(self, rows: list[Row], exc: BaseException) -> None:
        with self._lock:
            self._book.fail(rows, exc)


def _default_gen(files: TokenizerFiles) -> dict[str, Any]:
    """The stop set lmforge writes for a model with this tokenizer (no generation_config given)."""
    return generation_config(files)
