"""Prompts longer than the engine's per-step prefill budget, prefilled one budget-sized chunk a
step (first come, first served), so the running batch keeps decoding in between. A prompt with
a prefix cache hit starts after its cached positions, copied into its cache first."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from lmforge.serve.batch_cache import BatchCache
from lmforge.serve.causal_step import chunk_pass
from lmforge.serve.prefix_cache import PrefixCache
from lmforge.serve.request_book import Row


class ChunkedPrefills:
    """The queue of over-budget prompts and the first one's progress: its cache, columns done.
    prefix: the engine's prefix cache, looked up when a prompt's prefill begins."""

    def __init__(
        self, model: nn.Module, device: torch.device, budget: int, prefix: PrefixCache
    ) -> None:
        self.model, self.device, self.budget, self.prefix = model, device, budget, prefix
        self.rows: deque[Row] = deque()
        self.progress: tuple[BatchCache, int] | None = None  # the first row's, once begun

    def __bool__(self) -> bool:
        return bool(self.rows)

    def __iter__(self) -> Iterator[Row]:
        return iter(self.rows)

    def extend(self, rows: Iterable[Row]) -> None:
        self.rows.extend(rows)

    def remove(self, request_ids: set[str]) -> list[Row]:
        """Drops (and returns) the rows of these requests; the first one's progress with it."""
        gone = [r for r in self.rows if r.request_id in request_ids]
        for row in gone:
            if row is self.rows[0]:
                self.progress = None
            self.rows.remove(row)
        return gone

    def clear(self) -> None:
        self.rows.clear()
        self.progress = None

    def step(self, start: Callable[[Row], None]) -> tuple[BatchCache, Tensor] | None:
        """The next chunk of the first prompt (start(row) before its first chunk): at the
        prompt's end it leaves the queue and its cache and last logits come back, else
        None. A failing pass drops the row too, then raises."""
        row = self.rows[0]
        if self.progress is None:
            start(row)
            hit = self.prefix.lookup(row.chain)
            cache = BatchCache.empty(self.model, 1, len(row.prompt))
            hit.write(cache.k[:, 0], cache.v[:, 0], hit.tokens)
            self.progress = cache, hit.tokens
        cache, done = self.progress
        end = min(done + self.budget, len(row.prompt))
        try:
            logits = chunk_pass(self.model, cache, row.prompt, done, end, self.device)
        except Exception:
            self.rows.popleft()
            self.progress = None
            raise
        if logits is None:
            self.progress = cache, end
            return None
        self.rows.popleft()
        self.progress = None
        cache.pad_mask = torch.ones((1, end), dtype=torch.long, device=self.device)
        return cache, logits
