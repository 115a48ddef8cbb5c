"""Training data loaders: token windows for pretraining, packed rows for fine-tuning.

Every batch is a pure function of (seed, batch index), so a loader's whole state is its position:
a resumed run continues with exactly the batch it would have seen, and no RNG object has to be
pickled. Each distributed rank reads only its own slice of every global batch, so N ranks with
micro-batch B see the same global batch as one process with micro-batch N*B.

Batches are dicts of int64 tensors: `input_ids` and `labels` (B, T), labels -100 where no loss
is taken, plus `doc_ids` (B, T) for packed rows so attention can stay inside a document.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import InputError
from lmforge.model.transformer import IGNORE_INDEX

_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def open_tokens(path: Path, dtype: str) -> np.memmap:
    """Memory-map a flat token file (train.bin / val.bin) written by `lmforge tokenizer encode`."""
    if dtype not in _DTYPES:
        raise InputError(f"{path}: token dtype {dtype!r} is unknown; expected uint16 or uint32")
    if not Path(path).is_file():
        raise InputError(f"{path}: token file is missing; run `lmforge tokenizer encode`")
    return np.memmap(path, dtype=_DTYPES[dtype], mode="r")


class _SeekableBatches:
    """The cursor both loaders share: batch(index) is pure, so position + seed is the state.

    Subclasses set `position` and `seed` and define `batch(index)`; checkpoints save state_dict().
    """

    position: int
    seed: int

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = self.batch(self.position)
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position, self.seed = int(state["position"]), int(state["seed"])


class TokenWindows(_SeekableBatches):
    """Batches of (T+1)-token windows from a flat token array.

    shuffle=True: random contiguous windows (pretraining); batch `i` uses the RNG seeded with
    (seed, i). shuffle=False: consecutive non-overlapping windows from the start (evaluation),
    wrapping around at the end.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(tokens) < seq_len + 1:
            raise InputError(
                f"token file has {len(tokens)} tokens, fewer than seq_len+1={seq_len + 1}; "
                "lower train.seq_len or encode more data"
            )
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.position = 0

    @property
    def num_windows(self) -> int:
        """Non-overlapping windows in the file (what one sequential pass covers)."""
        return (len(self.tokens) - 1) // self.seq_len

    def _starts(self, index: int) -> np.ndarray:
        """Start offsets of this rank's rows in global batch `index`."""
        global_b = self.batch_size * self.world_size
        if self.shuffle:
            rng = np.random.default_rng([self.seed, index])
            starts = rng.integers(0, len(self.tokens) - self.seq_len, size=global_b)
        else:
            starts = (np.arange(global_b) + index * global_b) % self.num_windows * self.seq_len
        lo = self.rank * self.batch_size
        return starts[lo : lo + self.batch_size]

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """Global batch `index`, this rank's share; the same on every call."""
        t = self.seq_len
        rows = np.stack(
            [np.asarray(self.tokens[s : s + t + 1], dtype=np.int64) for s in self._starts(index)]
        )
        data = torch.from_numpy(rows)
        return {"input_ids": data[:, :t], "labels": data[:, 1:]}


def pack_documents(
    docs: Sequence[Sequence[int]],
    seq_len: int,
    *,
    loss_masks: Sequence[Sequence[int]] | None = None,
    pad_id: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Pack whole documents into rows of `seq_len` tokens (first fit, in order) for fine-tuning.

    A document that does not fit in the current row starts a new one, so examples are never split;
    one longer than `seq_len` is truncated and counted. `loss_masks[i][j] = 0` means token j of
    document i is context only (e.g. the prompt). Returns arrays (N, seq_len): `input_ids`,
    `labels` (next token, -100 across document boundaries, masked tokens and padding), `doc_ids`
    (0.. within a row, -1 on padding), and stats.
    """
    if loss_masks is not None and len(loss_masks) != len(docs):
        raise InputError(f"pack_documents: {len(docs)} documents but {len(loss_masks)} loss masks")
    rows: list[tuple[list[int], list[int], list[int]]] = []
    cur: tuple[list[int], list[int], list[int]] = ([], [], [])
    truncated = 0
    for i, doc in enumerate(docs):
        mask = list(loss_masks[i]) if loss_masks is not None else [1] * len(doc)
        if len(doc) > seq_len:
            truncated += 1
            doc, mask = doc[:seq_len], mask[:seq_len]
        if not doc:
            continue
        if len(cur[0]) + len(doc) > seq_len:
            rows.append(cur)
            cur = ([], [], [])
        doc_id = cur[2][-1] + 1 if cur[2] else 0
        cur[0].extend(doc)
        cur[1].extend(mask)
        cur[2].extend([doc_id] * len(doc))
    if cur[0]:
        rows.append(cur)

    n = len(rows)
    ids = np.full((n, seq_len), pad_id, dtype=np.int64)
    mask = np.zeros((n, seq_len), dtype=bool)
    doc_ids = np.full((n, seq_len), -1, dtype=np.int64)
    for r, (toks, m, d) in enumerate(rows):
        ids[r, : len(toks)], mask[r, : len(toks)], doc_ids[r, : len(toks)] = toks, m, d
    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    same_doc = (doc_ids[:, 1:] == doc_ids[:, :-1]) & (doc_ids[:, 1:] >= 0) & mask[:, 1:]
    labels[:, :-1] = np.where(same_doc, ids[:, 1:], IGNORE_INDEX)
    stats = {
        "rows": n,
        "documents": len(docs),
        "truncated": truncated,
        "pad_fraction": float((doc_ids < 0).mean()) if n else 0.0,
    }
    return {"input_ids": ids, "labels": labels, "doc_ids": doc_ids}, stats


class RowBatches(_SeekableBatches):
    """Shuffled batches over fixed rows (packed fine-tuning data), epoch after epoch.

    Epoch e visits rows in the permutation seeded with (seed, e); the state is the global batch
    position, so resume is exact. Each rank takes its own share of every global batch.
    """

    def __init__(
        self,
        rows: dict[str, np.ndarray],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.rows = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in rows.items()}
        self.n = len(next(iter(rows.values())))
        global_b = batch_size * world_size
        if self.n < global_b:
            raise InputError(
                f"only {self.n} packed rows for a global batch of {global_b}; "
                "lower train.micro_batch_size or add data"
            )
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = self.n // global_b
        self.position = 0

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        epoch, k = divmod(index, self.batches_per_epoch)
        if self.shuffle:
            order = torch.from_numpy(np.random.default_rng([self.seed, epoch]).permutation(self.n))
        else:
            order = torch.arange(self.n)
        global_b = self.batch_size * self.world_size
        lo = k * global_b + self.rank * self.batch_size
        idx = order[lo : lo + self.batch_size]
        return {name: t[idx] for name, t in self.rows.items()}
