"""Compiled decoding: one KV-cached decoding step, torch.compile'd once, on shapes fixed per batch.

generate() and the serving engine call model.hidden_states and lm_head directly, so
`train.compile` (model.compile(), which wraps forward) never reaches decoding. The eager step
cannot simply be compiled either: its keys span the cache up to start_pos (a Python int that
moves every token) and its pad_mask is (B, start_pos + 1), so every token has new shapes and
would recompile (or compile a dynamic-shape graph with guards on start_pos).

decode_step() sees the same shapes at every token instead: it attends over the cache's whole
storage (B, n_kv_head, capacity, hd) with a boolean mask `valid` (B, capacity) of the columns
that hold tokens, writes the new key/value at a column passed as a tensor, and takes each row's
position from that mask (its tokens so far), so the new token's value changes nothing a
compiled graph guards on. The columns past the last token cost attention work on them, which is
why generate() sizes its cache by decode_capacity (powers of two) and the engine's BatchCache
grows in chunks. Prefill stays eager: it runs once per request and its shapes are the prompt's.
"""

from __future__ import annotations

import threading
import types
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from lmforge.config import NOT_HASHED
from lmforge.errors import ConfigError

if TYPE_CHECKING:
    from lmforge.model.generate import KVCache

DecodeCompile = Literal["off", "on", "auto"]
COMPILE_HELP = (
    "torch.compile the decoding step of causal models: on, off, or auto (on for CUDA only: on a "
    "CPU the compile takes longer than it saves but for very long runs, docs/benchmarks.md)"
)
MIN_CAPACITY = 64  # the smallest cache generate() allocates when compiling: fewer shapes
BACKEND = "inductor"  # torch.compile's backend for decode_step (tests may use "aot_eager")


def compile_field() -> Any:
    """The `compile` setting (GenerationSettings, ServeSettings), default off. Not hashed: it
    changes how fast decoding runs, not what it decodes (the same greedy tokens, tested)."""
    return Field("off", description=COMPILE_HELP, json_schema_extra=NOT_HASHED)


def use_compiled_decode(mode: str, device: torch.device | str) -> bool:
    """Whether decoding on `device` compiles under `mode` (off | on | auto: CUDA only)."""
    if mode not in ("off", "on", "auto"):
        raise ConfigError(f"compile must be off, on or auto, got {mode!r}")
    return mode == "on" or (mode == "auto" and torch.device(device).type == "cuda")


def decode_capacity(total: int, block_size: int) -> int:
    """Cache columns for a generation spanning `total` positions: the next power of two (at
    least MIN_CAPACITY), never past block_size, so calls of nearby lengths share one shape."""
    capacity = MIN_CAPACITY
    while capacity < total:
        capacity *= 2
    return max(total, min(capacity, block_size))


class _ColumnWrite:
    """KVCache.update for decode_step: the step's key/value go into storage column `col` and
    the whole storage comes back, (B, n_kv_head, capacity, hd), masked by the step's `valid`."""

    def __init__(self, k: Tensor, v: Tensor, col: Tensor) -> None:
        self.k, self.v, self.col = k, v, col

    def update(self, layer: int, start_pos: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # one index_put_ into the whole storage, not a write through the view k[layer]: the
        # compiled graph turns a mutated view into a copy of the whole cache per layer per step
        # (measured: `tiny`, 16 rows, 4.7x the eager step's time; this way 0.96x)
        at = (torch.tensor([layer], device=k.device), slice(None), slice(None), self.col)
        self.k[at] = k.permute(2, 0, 1, 3)  # (1, B, n_kv_head, hd): indexed dims come first
        self.v[at] = v.permute(2, 0, 1, 3)
        return self.k[layer], self.v[layer]


def decode_step(
    model: nn.Module, ids: Tensor, valid: Tensor, col: Tensor, k: Tensor, v: Tensor
) -> Tensor:
    """One token per row at storage column col; next-token logits (B, V).

    ids (B, 1) the tokens; valid (B, capacity) bool, True at the columns holding tokens, the
    new one at col included; col (1,) long; k, v (n_layer, B, n_kv_head, capacity, hd) the
    cache's storage, written in place. Each row's position is its count of tokens before this
    one, as pad_positions gives a left-padded row in the eager step.
    """
    pos = valid.sum(dim=1, keepdim=True) - 1  # (B, 1)
    x = model.embed(ids, pos)  # (B, 1, C)
    rope = model.rope_at(pos)
    mask = valid[:, None, None, :]  # (B, 1, 1, capacity): the one query row
    window = model.config.sliding_window
    if window is not None:  # as attention_mask: query column minus key column < window
        cols = torch.arange(valid.size(1), device=valid.device)
        mask = mask & (col - cols < window)
    cache = _ColumnWrite(k, v, col)
    for block in model.blocks:
        x = block(x, rope, mask, cache, 0)
    return model.lm_head(model.norm_f(x)[:, -1])  # (B, V)


_STEPS: weakref.WeakKeyDictionary[nn.Module, Callable[..., Tensor]] = weakref.WeakKeyDictionary()
_STEPS_LOCK = threading.Lock()  # engines of several models start from several threads


def compiled_decode_step(model: nn.Module) -> Callable[..., Tensor]:
    """decode_step under torch.compile (BACKEND) for `model`: its graphs compile once and serve
    every later generation with the same shapes. Each model has its own copy of decode_step's
    code, because dynamo keeps graphs and counts recompiles per code object: one shared copy
    stops compiling at torch._dynamo.config.recompile_limit (8) graphs in a process, which a few
    model architectures reach, and then runs eagerly with no more than a logged warning."""
    with _STEPS_LOCK:
        step = _STEPS.get(model)
        if step is None:
            step = _STEPS[model] = torch.compile(_own_code(decode_step), backend=BACKEND)
    return step


def _own_code(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """fn with a code object of its own (where dynamo's cache of fn's graphs lives)."""
    return types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )


class FixedShapeSteps:
    """generate()'s decoding steps through the compiled decode_step, after an eager prefill of
    `prompt_len` columns into `cache` (pad_mask (B, prompt_len), or None: no padding). Each
    call feeds one token per row at the next column and returns next-token logits (B, V)."""

    def __init__(
        self, model: nn.Module, cache: KVCache, pad_mask: Tensor | None, prompt_len: int
    ) -> None:
        self.model, self.k, self.v = model, cache.k, cache.v
        B, capacity = self.k.size(1), self.k.size(3)
        self.valid = torch.zeros((B, capacity), dtype=torch.bool, device=self.k.device)
        self.valid[:, :prompt_len] = True if pad_mask is None else pad_mask.bool()
        self.next = prompt_len  # the column the next token goes to (col on the device)
        self.col = torch.tensor([prompt_len], device=self.k.device)
        self.step = compiled_decode_step(model)

    def __call__(self, ids: Tensor) -> Tensor:
        if self.next >= self.valid.size(1):
            raise ValueError(f"KV cache holds {self.valid.size(1)} positions, step needs more")
        self.valid[:, self.next] = True
        logits = self.step(self.model, ids, self.valid, self.col, self.k, self.v)
        self.next += 1
        self.col += 1  # in place on the device: no host-to-device copy per token
        return logits
