"""The engine's public types beside its requests and events: its two refusals and its stats."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import LmforgeError
from lmforge.serve.prefix_cache import NO_PREFIX_CACHE, PrefixCacheStats


class QueueFull(LmforgeError):
    """The waiting queue is full: retry later (HTTP 429)."""


class EngineClosed(LmforgeError):
    """The engine is shutting down or stopped and takes no new requests (HTTP 503)."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for /metrics."""

    queue_depth: int  # requests waiting for a batch slot
    running: int  # rows in the running batch
    max_batch_size: int
    steps: int  # decoding steps run (prefills not counted)
    prefills: int  # prefill passes run
    prompt_tokens: int  # prompt tokens prefilled, all time
    generated_tokens: int  # tokens generated, all time
    finished: int  # requests finished (any finish_reason), all time
    cache_tokens: int  # KV positions the running batch spans (rows x L, padding included)
    cache_capacity: int  # KV positions allocated (rows x storage columns)
    prefix: PrefixCacheStats = NO_PREFIX_CACHE  # the prefix cache's (zeros when off)
