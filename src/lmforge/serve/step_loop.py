"""The serving engine's step loop: what its background thread does, one step at a time.

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
   (serve/detok.py) and pushes a TokenEvent to its RequestHandle; finished rows (stop, length,
   abort) first store their prompt + answer blocks in the prefix cache, so a chat's next turn
   reuses the answer too, then leave the batch (index_select) and all-padding leading columns are trimmed, so L stays <= block_size.

StepLoop orders these steps under one lock and owns what they share: the running batch (its rows
and BatchCache), the request book, the prefix cache and the chunked prefills. It composes the
parts beside it: the scheduling policy of steps 1-2 (serve/scheduler.py: admit, plan_prefill,
prefill_groups), the forward passes of steps 2-3 (serve/causal_step.py, which also says why the
batch is one right-aligned cache rather than fixed slots, with measurements), emission of step 4
(serve/emit.py), and the requests' queue, aborts, final events and counts
(serve/request_book.py). Before each forward pass it names the pass's rows' LoRA adapters
(serve/multi_lora.py; none attached: nothing), and between two steps it installs a change of
the adapters loaded at runtime (_install_adapters). Engine (serve/engine.py) adds the public API and
starts and stops the thread. Seq2SeqEngine overrides the steps that depend on the model's shape (_prefill,
_prefill_forward, _history_start, _decode, _keep, _cache_usage): its batch is cohorts, each with
its own encoder output and decoder cache, not one right-aligned cache; the loop, admission,
emission and failure handling are shared as they are.

Failures stay local: an exception while prefilling retries the newcomers one by one and fails
(finish_reason "error") only those that fail alone; one in a decoding step fails the rows of that
step; an exception while emitting a row's token fails that row. The loop keeps serving.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lmforge.model.compiled_decode import use_compiled_decode
from lmforge.serve.batch_cache import BatchCache
from lmforge.serve.causal_step import decode_pass, prefill_pass
from lmforge.serve.chunked_prefill import ChunkedPrefills
from lmforge.serve.detok import TextStream
from lmforge.serve.emit import emit_tokens
from lmforge.serve.handle import WakeBatch
from lmforge.serve.multi_lora import AdapterSlots, install
from lmforge.serve.prefix_cache import PrefixCache
from lmforge.serve.request_book import RequestBook, Row
from lmforge.serve.sampling import new_generator
from lmforge.serve.scheduler import admit, plan_prefill
from lmforge.tokenizer.files import TokenizerFiles

log = logging.getLogger(__name__)


class StepLoop:
    """The engine's background loop and the steps it runs on the running batch (see above)."""

    def __init__(
        self,
        model: nn.Module,
        files: TokenizerFiles,
        *,
        max_batch_size: int,
        max_prefill_tokens: int,
        compile: str,
        prefix_cache_mb: float,
    ) -> None:
        self.model = model.eval()
        self.files = files
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens  # prompt tokens prefilled per step
        self.device = next(model.parameters()).device
        # decoding steps through model/compiled_decode.py (off | on | auto: CUDA only)
        self.compiled_decode = use_compiled_decode(compile, self.device)
        self._lock = threading.Condition()
        self._book = RequestBook()  # waiting, active and abort-asked requests; the counts
        self._running: list[Row] = []
        self._cache: BatchCache | None = None
        # prompts' leading blocks' keys/values, reused by later prompts (serve/prefix_cache.py)
        self._prefix = PrefixCache.for_model(model, prefix_cache_mb)
        # prompts over the budget, prefilled a chunk a step
        self._chunked = ChunkedPrefills(self.model, self.device, max_prefill_tokens, self._prefix)
        self._stopping = False  # set by shutdown: the loop returns once nothing is left
        self._adapters = AdapterSlots()  # LoRA adapters' slots (serve/multi_lora.py): none yet
        self._lora: dict = {}  # adapter name -> its updates, the set _adapters serves
        self._lora_pending: tuple | None = None  # a runtime change, installed between steps

    @property
    def _counts(self) -> dict[str, int]:
        """(lock held) The all-time counts EngineStats reports (Seq2SeqEngine counts its steps)."""
        return self._book.counts

    def _cache_usage(self) -> tuple[int, int]:
        """(lock held) KV positions the running batch spans, and those allocated."""
        cache = self._cache
        if cache is None:
            return 0, 0
        return len(self._running) * cache.length, cache.rows * cache.capacity

    def _loop(self) -> None:
        book = self._book
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not (book.waiting or self._running or self._chunked or self._stopping
                               or self._lora_pending):  # fmt: skip
                        self._lock.wait()
                    self._install_adapters()
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

    def _install_adapters(self) -> None:
        """(lock held, between steps: no forward runs) A pending change of the LoRA adapters
        served (Engine.load_adapter / unload_adapter) goes into the model."""
        if self._lora_pending is None:
            return
        self._lora, self._adapters, stacks, done = self._lora_pending
        install(self.model, self._adapters, stacks)
        self._lora_pending = None
        done.set()

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
        kept = set(keep)
        self._store_answers([i for i in range(len(self._running)) if i not in kept])
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
        with self._prefix.holding([r.chain for r in rows]) as cached:  # each pass finds them
            todo = [r.prompt[c:] for r, c in zip(rows, cached, strict=True)]  # what is not cached
            whole, chunked = plan_prefill(todo, self.max_prefill_tokens)
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
        self._adapters.select([row.adapter])
        try:
            prefilled = self._chunked.step(self._start)
            if prefilled is not None:  # the row has left _chunked: a failure must name it here
                self._prefix.store_batch([row.chain], prefilled[0])
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
        row.stream = TextStream(self.files.tokenizer, row.params.stop, row.params.keep_special)
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
        hits = [self._prefix.lookup(r.chain) for r in rows]
        self._adapters.select([r.adapter for r in rows])
        cache, logits = prefill_pass(self.model, [r.prompt for r in rows], self.device, hits)
        self._prefix.store_batch([r.chain for r in rows], cache)
        for row in rows:
            self._start(row)
        return cache, logits

    def _decode(self) -> None:
        """One decoding step for the whole running batch."""
        rows, cache = self._running, self._cache
        assert cache is not None
        try:
            tokens = [r.pending for r in rows]
            self._adapters.select([r.adapter for r in rows])
            logits = decode_pass(self.model, cache, tokens, self.device, self.compiled_decode)
        except Exception as exc:  # fail this step's rows, keep serving
            log.exception("decoding step failed for %d requests", len(rows))
            self._fail(rows, exc)
            with self._lock:
                self._running, self._cache = [], None
            return
        for row in rows:  # its cache now holds the token it fed
            row.chain.append(row.pending)
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
            if leave is not None:  # rows of the running batch: keep the answers that end well
                ended = {row for row, event in emitted.finals if event.finish_reason != "error"}
                self._store_answers([i for i, row in enumerate(rows) if row in ended])
            with self._lock:
                if leave is not None:
                    leave(emitted.keep)
                for row, event in emitted.finals:
                    self._book.finish(row, event)
                self._counts["generated_tokens"] += emitted.sampled
            return emitted.keep
        finally:
            wakes.send()

    def _store_answers(self, ending: list[int]) -> None:
        """Stores the prefix-cache blocks of these running rows, which end now: their prompt and
        answer, every token their cache holds (serve/prefix_cache.py), before their cache rows
        are dropped, so a chat's next turn reuses the answer too."""
        if ending and self._cache is not None and self._prefix.budget:
            chains = [self._running[i].chain for i in ending]
            self._prefix.store_batch(chains, self._cache, ending)

    def _fail(self, rows: list[Row], exc: BaseException) -> None:
        with self._lock:
            self._book.fail(rows, exc)
