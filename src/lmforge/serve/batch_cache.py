"""The running batch's KV cache: rows right-aligned at one common length, padding on the left.

Continuous batching needs rows to join and leave between decoding steps. The Transformer already
decodes left-padded batches (pad_mask gives each row its own positions and hides padding from
attention), so the batch keeps that layout: every row's tokens end at column L, the columns before
a row's first token are padding (pad_mask 0). Then

- a decoding step feeds one token per row at start_pos=L, one forward pass for the whole batch;
- joining rows (prefilled on their own, in the same layout) merge by left-padding the shorter of
  the two blocks to the longer one's length and concatenating rows;
- leaving rows are dropped with index_select, and columns that are padding in every remaining row
  are trimmed by moving a start offset (no copy), so L stays the longest live row, which a request
  never lets exceed the model's block_size.

The storage grows in chunks of GROW columns, never past the model's block_size (and compacts
before it grows), so a decoding step normally only writes one column. `update()` has KVCache's
signature, so Transformer.forward uses this cache unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmforge.model.generate import KVCache

GROW = 64  # columns added when the storage is full: few reallocations, little waste


class BatchCache:
    """Keys/values (n_layer, B, n_kv_head, capacity, hd) with rows right-aligned at length L."""

    def __init__(self, k: Tensor, v: Tensor, pad_mask: Tensor, limit: int, start: int = 0) -> None:
        self.k, self.v = k, v
        self.limit = limit  # most columns ever needed: the model's block_size
        self.start = start  # storage column of logical position 0
        self.pad_mask = pad_mask  # (B, L) long: 1 = token, 0 = padding
        self._padded: tuple[Tensor, bool] | None = None  # padded() of that mask, kept per step

    @classmethod
    def empty(cls, model: nn.Module, rows: int, length: int) -> BatchCache:
        """A cache for `rows` rows of `length` positions and room to grow, on the model's
        device and in its dtype."""
        limit = model.config.block_size
        kv = KVCache.for_model(model, rows, _grown(length, limit))
        mask = torch.zeros((rows, 0), dtype=torch.long, device=kv.k.device)
        return cls(kv.k, kv.v, mask, limit)

    @property
    def rows(self) -> int:
        return self.pad_mask.size(0)

    @property
    def length(self) -> int:
        """L: positions every row spans (padding included)."""
        return self.pad_mask.size(1)

    @property
    def capacity(self) -> int:
        return self.k.size(3)

    def padded(self) -> bool:
        """Whether any row has padding (if not, attention can take the unmasked fast path)."""
        if self._padded is None or self._padded[0] is not self.pad_mask:  # a host sync: once
            # per change of rows, not per step (extend_mask keeps the answer)
            self._padded = self.pad_mask, bool(self.rows) and not bool(self.pad_mask[:, 0].all())
        return self._padded[1]

    def update(self, layer: int, start_pos: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """KVCache.update: store k, v (B, n_kv_head, T, hd) at start_pos, return keys up to there."""
        lo = self.start + start_pos
        hi = lo + k.size(2)
        if hi > self.capacity:
            raise ValueError(f"BatchCache holds {self.capacity} columns, step needs {hi}")
        self.k[layer, :, :, lo:hi] = k
        self.v[layer, :, :, lo:hi] = v
        return self.k[layer, :, :, self.start : hi], self.v[layer, :, :, self.start : hi]

    def row_kv(self, row: int, n: int) -> tuple[Tensor, Tensor]:
        """Views of one row's keys/values at its last n positions: (n_layer, n_kv_head, n, hd)."""
        hi = self.start + self.length
        return self.k[:, row, :, hi - n : hi], self.v[:, row, :, hi - n : hi]

    def reserve(self, n: int) -> None:
        """Make room for n more columns after L: compact to start 0 first, grow if still short."""
        need = self.length + n
        if self.start + need <= self.capacity:
            return
        capacity = self.capacity if need <= self.capacity else _grown(need, self.limit)
        self.k, self.v = (self._moved(t, capacity, 0) for t in (self.k, self.v))
        self.start = 0

    def extend_mask(self, n: int = 1) -> Tensor:
        """pad_mask with n more token columns: the (B, L + n) mask a step of n tokens needs."""
        ones = torch.ones((self.rows, n), dtype=torch.long, device=self.pad_mask.device)
        known = self._padded is not None and self._padded[0] is self.pad_mask
        self.pad_mask = torch.cat([self.pad_mask, ones], dim=1)
        if known:
            self._padded = self.pad_mask, self._padded[1]
        return self.pad_mask

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order), then trim the columns that are all padding."""
        if len(rows) == self.rows:
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.k.device)
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)
        self.pad_mask = self.pad_mask.index_select(0, index)
        if rows:
            first = int(self.pad_mask.argmax(dim=1).min())  # earliest first token of any row
            self.start += first
            self.pad_mask = self.pad_mask[:, first:]
        else:
            self.start, self.pad_mask = 0, self.pad_mask[:, :0]

    def merge(self, others: list[BatchCache]) -> None:
        """Appends others' rows (prefilled joiners) after ours, all right-aligned at the longest
        length, in one copy."""
        blocks = [self, *others]
        L = max(c.length for c in blocks)
        capacity = _grown(L, self.limit)
        self.k, self.v = (
            torch.cat([self._moved(getattr(c, kv), capacity, L - c.length, c) for c in blocks], 1)
            for kv in ("k", "v")
        )
        pad = torch.nn.functional.pad
        self.pad_mask = torch.cat([pad(c.pad_mask, (L - c.length, 0)) for c in blocks], dim=0)
        self.start = 0

    def _moved(self, t: Tensor, capacity: int, shift: int, src: BatchCache | None = None) -> Tensor:
        """t's live columns copied into new storage of `capacity` columns, at column `shift`."""
        src = src or self
        out = t.new_zeros((*t.shape[:3], capacity, t.size(4)))
        live = t[:, :, :, src.start : src.start + src.length]
        out[:, :, :, shift : shift + src.length] = live
        return out


def _grown(length: int, limit: int) -> int:
    """Storage columns for `length` live ones: GROW more, but no more than the limit needs."""
    return max(length, min(length + GROW, limit))
