"""The KV cache of autoregressive decoding: every layer's keys and values, preallocated.

generate(), beam search (reorder_cache), speculative decoding, seq2seq's decoder and serve's
batch cache all write one; attention reads back the positions written so far.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class KVCache:
    """Keys and values of every layer, preallocated: k[layer] is (B, n_kv_head, max_len, hd)."""

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # positions written so far: what reorder_cache copies
        self._spare: tuple[Tensor, Tensor] | None = None  # reorder_cache's target buffers

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int, max_len: int) -> KVCache:
        """A cache shaped for `model` (a Transformer), on its device and in its dtype."""
        cfg = model.config
        p = next(model.parameters())
        return cls(
            cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.hd, device=p.device, dtype=p.dtype
        )

    def update(self, layer: int, start_pos: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, n_kv_head, T, hd) at start_pos; return all keys/values up to there."""
        end = start_pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, step needs {end}")
        self.k[layer, :, :, start_pos:end] = k
        self.v[layer, :, :, start_pos:end] = v
        self.length = max(self.length, end)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, n_kv_head, end, hd)

    def reorder_cache(self, rows: Tensor) -> None:
        """Keep rows[i] as row i (beam search: each beam takes its parent's keys and values);
        rows may repeat or grow the batch. transformers' caches have the same method."""
        if rows.numel() != self.k.size(1):  # a new batch size: the prompts' rows to their beams
            self.k, self.v = self.k.index_select(1, rows), self.v.index_select(1, rows)
            self._spare = None
            return
        if self._spare is None:
            self._spare = (torch.empty_like(self.k), torch.empty_like(self.v))
        n = self.length  # into the spare buffers (no allocation), only the written positions
        for src, dst in zip((self.k, self.v), self._spare, strict=True):
            torch.index_select(src[:, :, :, :n], 1, rows, out=dst[:, :, :, :n])
        (self.k, self.v), self._spare = self._spare, (self.k, self.v)
