"""Embedder: a model's pooled, L2-normalised hidden states for /v1/embeddings, batched across
requests on one thread of its own.

Pooling as serve/embeddings_pooling.py chooses and computes it (mean, cls or last); vectors are
L2-normalised unless normalize is off (`embedder_settings`: --embed-normalize, else a
sentence-transformers directory's Normalize module as vLLM reads it, else on).

Batching: submit_many() queues a request's token ids (all or none) and returns Futures; the
thread takes what is waiting (up to max_batch_size inputs, first come first served), sorts it by
length, cuts it into batches of at most max_batch_tokens padded tokens, right-pads each and runs
one forward per batch; a forward that raises fails only its own batch's inputs. An encoder's
padding is hidden by the pad mask, a decoder's by causal attention (pooling reads only real
tokens), so a vector does not depend on what it was batched with (to float rounding). A decoder
shares its module with its generation engine (one copy of the weights): forward passes without a
cache keep no state, so the two threads never write to each other (tested with the engine's
decoding step eager and torch.compile'd). They do compete for the device: an embedding batch's
activations sit beside the engine's KV cache, and on a CPU both threads' intra-op pools share
the cores.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.serve.embeddings_pooling import (
    checkpoint_matryoshka,
    checkpoint_max_length,
    checkpoint_normalize,
    checkpoint_pooling,
    pool_states,
    resolve_pooling,
)
from lmforge.serve.engine_threads import configure_threads
from lmforge.serve.engine_types import EngineClosed, QueueFull
from lmforge.tokenizer.files import TokenizerFiles

log = logging.getLogger(__name__)

MAX_BATCH_TOKENS = 16384  # padded tokens per forward: bounds a batch's activation memory


class Embedder:
    """Embeddings of one model; submit() from any thread, start() before, shutdown() after."""

    def __init__(
        self,
        model: nn.Module,
        files: TokenizerFiles,
        *,
        name: str,
        pooling: str = "auto",
        normalize: bool = True,
        max_batch_size: int = 32,
        max_queue: int = 256,
        max_batch_tokens: int = MAX_BATCH_TOKENS,
        threads: int | None = None,
        max_seq_length: int | None = None,
        matryoshka: tuple[int, ...] | None = None,
    ) -> None:
        configure_threads(threads)
        block_size = model.config.block_size
        self.model = model.eval()
        self.files = files
        self.name = name
        self.causal: bool = model.config.causal
        self.pooling = resolve_pooling(pooling, self.causal, name)
        self.normalize = normalize
        # the longest input: the context, or a sentence-transformers dir's shorter max_seq_length
        self.max_context: int = min(block_size, max_seq_length or block_size)
        self.dim: int = model.config.n_embd
        # sizes `dimensions` may ask for (() = any up to dim), None: not a Matryoshka model
        self.matryoshka = matryoshka
        self.vocab_size: int = model.config.vocab_size
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.max_batch_tokens = max(max_batch_tokens, self.max_context)  # one input always fits
        self.device = next(model.parameters()).device
        self._lock = threading.Condition()
        self._waiting: deque[tuple[list[int], Future]] = deque()
        self._closed = False
        self._thread: threading.Thread | None = None

    def tokenize(self, text: str, max_len: int | None = None) -> list[int]:
        """The model input of a text as transformers' tokenizer(text) makes it: an encoder's
        specials ([CLS] text [SEP]) or a decoder's (a BOS where its tokenizer adds one); cut to
        max_len tokens keeping the specials, as truncation=True does."""
        return self.files.encode_input(text, max_len=max_len)[0]

    def start(self) -> None:
        with self._lock:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._loop, name=f"embed-{self.name}")
                self._thread.daemon = True
                self._thread.start()

    def submit(self, ids: list[int]) -> Future:
        """A Future of the input's vector (C,) float32 on the CPU (submit_many of one)."""
        return self.submit_many([ids])[0]

    def submit_many(self, rows: list[list[int]]) -> list[Future]:
        """Futures of the rows' vectors, queued all or none: QueueFull when max_queue inputs
        would be passed (a request larger than max_queue still goes into an empty queue, so
        one of OpenAI's 2048-input requests is not refused forever), EngineClosed once shut
        down."""
        futures: list[Future] = [Future() for _ in rows]
        with self._lock:
            if self._closed:
                raise EngineClosed(f"embedder {self.name!r} is shut down")
            if self._waiting and len(self._waiting) + len(rows) > self.max_queue:
                raise QueueFull(f"embedder {self.name!r}: {len(self._waiting)} inputs waiting, "
                                f"{len(rows)} more would pass {self.max_queue}")  # fmt: skip
            self._waiting.extend(zip(rows, futures, strict=True))
            self._lock.notify()
        return futures

    def queue_depth(self) -> int:
        with self._lock:
            return len(self._waiting)

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stops taking inputs; drain: embed those waiting first (up to timeout seconds), else
        fail them with EngineClosed."""
        with self._lock:
            self._closed = True
            if not drain:
                self._fail_waiting()
            self._lock.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        with self._lock:  # what the drain did not reach in time
            self._fail_waiting()

    def _fail_waiting(self) -> None:
        while self._waiting:
            _, future = self._waiting.popleft()
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineClosed(f"embedder {self.name!r} shut down"))

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._closed:
                    self._lock.wait()
                if not self._waiting:
                    return  # closed and drained
                n = min(len(self._waiting), self.max_batch_size)
                taken = [self._waiting.popleft() for _ in range(n)]
            taken = [(ids, f) for ids, f in taken if f.set_running_or_notify_cancel()]
            rows = [ids for ids, _ in taken]
            for batch in self._batches(rows):
                self._run([taken[i] for i in batch])

    def _run(self, batch: list[tuple[list[int], Future]]) -> None:
        """One forward's futures answered: their vectors, or its error (only this batch's
        inputs get it; the thread goes on with the next)."""
        try:
            vectors = self._forward([ids for ids, _ in batch])
        except Exception as exc:
            log.exception("embedder %s: a batch of %d inputs failed", self.name, len(batch))
            for _, future in batch:
                future.set_exception(exc)
            return
        for (_, future), vector in zip(batch, vectors, strict=True):
            future.set_result(vector)

    def _batches(self, rows: list[list[int]]) -> list[list[int]]:
        """The rows' indices sorted by length and cut into batches of at most max_batch_tokens
        padded tokens (B * the longest), so a batch's activations stay bounded; attention's
        scores still grow with the longest row squared."""
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        batches, start = [], 0
        while start < len(order):
            end = start + 1  # sorted: the batch's last row is its longest
            while end < len(order) and len(rows[order[end]]) * (end - start + 1) <= (
                self.max_batch_tokens
            ):
                end += 1
            batches.append(order[start:end])
            start = end
        return batches

    def embed(self, rows: list[list[int]]) -> list[Tensor]:
        """The vectors of rows (each non-empty, within the context), in order, on the calling
        thread: run in the batches _batches plans."""
        out: list[Tensor | None] = [None] * len(rows)
        for batch in self._batches(rows):
            for i, vector in zip(batch, self._forward([rows[i] for i in batch]), strict=True):
                out[i] = vector
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _forward(self, rows: list[list[int]]) -> Tensor:
        """(B, C) pooled (and normalised) float32 vectors on the CPU of right-padded rows."""
        T = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[b, : len(r)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        # an encoder's pad keys masked; a decoder's right padding is after every real token
        h = self.model.hidden_states(ids, pad_mask=None if self.causal else mask)  # (B, T, C)
        pooled = pool_states(h.float(), mask, self.pooling)  # (B, C), pooled in float32
        if self.normalize:
            pooled = F.normalize(pooled, dim=-1)
        return pooled.cpu()


def embedder_settings(settings: Any, model_dir: Path) -> dict[str, Any]:
    """The Embedder keywords a ServeSettings gives model_dir: --embed-pooling, or under auto the
    pooling its checkpoint names (embeddings_pooling.checkpoint_pooling); --embed-normalize, or
    unset, its modules.json's Normalize module (checkpoint_normalize), else on; the longest input
    its sentence_bert_config.json allows (checkpoint_max_length, which checks modules.json even
    when both flags are given: a Dense module is refused); the Matryoshka sizes its config.json
    declares (checkpoint_matryoshka)."""
    max_seq_length = checkpoint_max_length(model_dir)
    pooling, normalize = settings.embed_pooling, settings.embed_normalize
    if pooling == "auto":
        pooling = checkpoint_pooling(model_dir) or "auto"
    if normalize is None:
        normalize = checkpoint_normalize(model_dir) is not False
    return {
        "pooling": pooling, "normalize": normalize,
        "max_batch_size": settings.max_batch_size, "max_queue": settings.max_queue,
        "threads": settings.torch_threads(), "max_seq_length": max_seq_length,
        "matryoshka": checkpoint_matryoshka(model_dir),
    }  # fmt: skip
