"""Response cache: deterministic requests are answered from memory instead of the model.

A request is deterministic when it samples greedily (temperature 0) or fixes a seed: the engine
then returns the same tokens whatever batch it runs in, so the answer can be replayed. The key
covers everything that changes the output -- the model (its name and the content identity of its
directory, so a retrained model in the same place misses), the prompt, and every sampling
parameter -- and nothing else (not the request id, not the time).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["ResponseCache", "cache_key", "is_deterministic", "model_identity"]


def model_identity(name: str, model_dir: Path | str) -> str:
    """`name@hash`: the model's name plus the content hash of its directory (artifacts'
    content_hash: a stage's recorded output hashes, else the files' bytes)."""
    from lmforge.artifacts import content_hash

    return f"{name}@{content_hash(Path(model_dir))}"


def _params_dict(params: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        return dataclasses.asdict(params)
    if isinstance(params, Mapping):
        return dict(params)
    raise TypeError(f"sampling params must be a dataclass or a mapping, got {type(params)}")


def is_deterministic(params: Any) -> bool:
    """Greedy decoding or a fixed seed: the same request always gives the same answer."""
    p = _params_dict(params)
    return p.get("temperature", 1.0) == 0 or p.get("seed") is not None


def cache_key(model: str, prompt: str | Sequence[int], params: Any) -> str | None:
    """A stable key for (model, prompt, params), or None when the request is not deterministic.

    `model` should identify the weights, not only the name (see model_identity). A prompt given as
    text and the same prompt given as token ids are different keys: the server passes one form
    consistently.
    """
    if not is_deterministic(params):
        return None
    prompt_part: Any = prompt if isinstance(prompt, str) else [int(t) for t in prompt]
    payload = {"model": model, "prompt": prompt_part, "params": _params_dict(params)}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=list)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _approx_size(value: Any) -> int:
    """Bytes a cached value costs, roughly: its UTF-8 JSON length (strings and bytes exactly)."""
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return len(json.dumps(value, default=str).encode("utf-8"))


class ResponseCache:
    """Thread-safe LRU bounded by entry count and, optionally, by total bytes of values.

    `get` counts a hit or a miss (a None key -- a non-deterministic request -- counts neither, so
    the hit rate measures what could be cached); `put` of a value larger than max_bytes stores
    nothing.
    """

    def __init__(
        self,
        max_entries: int = 1024,
        max_bytes: int | None = None,
        size_of: Callable[[Any], int] = _approx_size,
    ):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1 or None, got {max_bytes}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._size_of = size_of
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: str | None) -> Any | None:
        """The cached value (now the most recently used), or None."""
        if key is None:
            return None
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: str | None, value: Any) -> None:
        """Stores value under key, evicting the least recently used entries to fit."""
        if key is None:
            return
        size = self._size_of(value) if self.max_bytes is not None else 0
        if self.max_bytes is not None and size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, size)
            self._bytes += size
            while len(self._items) > self.max_entries or (
                self.max_bytes is not None and self._bytes > self.max_bytes
            ):
                _, (_, evicted) = self._items.popitem(last=False)
                self._bytes -= evicted
                self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        """Membership without touching the LRU order or the counters."""
        return key in self._items

    @property
    def nbytes(self) -> int:
        return self._bytes

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def keys(self) -> list[str]:
        """Keys from least to most recently used (a snapshot)."""
        with self._lock:
            return list(self._items)
