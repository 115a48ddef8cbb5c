"""Calibration for GPTQ / AWQ: token windows to run through the model, and each block's inputs
and its Linears' inputs, captured block by block with forward hooks.

The windows come from the stage's inputs: `tokens` (train.bin of `lmforge tokenizer encode`)
or the texts of a `data` split (each document after the model's start token, concatenated),
cut into non-overlapping windows of which a seed picks n without replacement. BlockInputs holds
what the next block receives: the first block's arguments are caught by a pre-hook on the real
forward (embeddings, rotary tables and mask as the model makes them), and after a block is
calibrated, its outputs become the next block's inputs: GPTQ's with the rounded weights, so
each block is calibrated on the inputs it will see once its predecessors are rounded
(GPTQModel's sequential order); AWQ's with its scaled and clipped float weights (RTN rounds
the whole checkpoint afterwards).

Memory, beyond the model (n windows of T tokens, width C, float32): BlockInputs keeps every
window's hidden states, n x T x C x 4 bytes, twice while advance() computes the next block's;
GPTQ adds a float64 in x in Hessian per Linear of the block; AWQ keeps every Linear's inputs
(linear_inputs_of), n x T x (sum of the block's in_features) x 4 bytes, twice while they are
concatenated (an MoE expert's Linears only its routed tokens, top-k of them in all).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.errors import InputError

log = logging.getLogger(__name__)


def token_windows(stream: np.ndarray, n: int, seq_len: int, seed: int, where: object) -> Tensor:
    """n windows (n, seq_len) of a token stream drawn without replacement from its
    non-overlapping windows, so no token calibrates twice; the same for the same seed. A stream
    with fewer than n windows gives all of them (logged; compression.json's samples says so)."""
    count = len(stream) // seq_len
    if count == 0:
        raise InputError(
            f"{where} holds {len(stream)} tokens, fewer than one calibration window of "
            f"{seq_len}; give more text or lower quantize.calibration_seq_len"
        )
    if count < n:
        log.warning("%s holds %d calibration windows of %d tokens, not %d: using all of them",
                    where, count, seq_len, n)  # fmt: skip
    picked = np.random.default_rng(seed).choice(count, size=min(n, count), replace=False)
    rows = [np.asarray(stream[s : s + seq_len], dtype=np.int64) for s in np.sort(picked) * seq_len]
    return torch.from_numpy(np.stack(rows))


def shard_calibration(tokens: Path, model_dir: Path, n: int, seq_len: int, seed: int) -> Tensor:
    """Windows of the train shard of `tokens` (checked to be model_dir's tokenizer's)."""
    from lmforge.train.loader import open_tokens
    from lmforge.train.pretrain import read_token_meta

    meta = read_token_meta(tokens, model_dir)
    train = tokens / "train.bin"
    return token_windows(open_tokens(train, meta["dtype"]), n, seq_len, seed, train)


POOL = 4  # windows are drawn from the first POOL x n x seq_len tokens of a data split's texts


def text_calibration(
    texts: Iterable[str], encode: Callable[[str], list[int]], start: int | None, n: int,
    seq_len: int, seed: int, where: object,
) -> Tensor:  # fmt: skip
    """Windows of the texts' tokens, each document after the start token (if any); only the
    first POOL x n x seq_len tokens are encoded, so a large split costs no more than it needs."""
    head = [start] if start is not None else []
    ids: list[int] = []
    for text in texts:
        if len(ids) > POOL * n * seq_len:
            break
        ids += [*head, *encode(text)]
    return token_windows(np.array(ids, dtype=np.int64), n, seq_len, seed, where)


class _Caught(Exception):
    """Raised by the first block's pre-hook: the rest of the forward is not needed."""


@dataclass
class BlockInputs:
    """The calibration batches' inputs to the current block: hidden states (one (b, T, C)
    tensor a batch) and the other arguments the model passed (rotary tables, mask)."""

    hidden: list[Tensor]
    rest: list[tuple[tuple[Any, ...], dict[str, Any]]]

    @classmethod
    @torch.no_grad()
    def first(cls, model: nn.Module, ids: Tensor, batch_size: int = 8) -> BlockInputs:
        """What model.blocks[0] receives on ids (n, T), in batches of batch_size windows."""
        hidden, rest = [], []

        def catch(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden.append(args[0])
            rest.append((args[1:], kwargs))
            raise _Caught

        handle = model.blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            for batch in ids.split(batch_size):
                with suppress(_Caught):
                    model(batch)
        finally:
            handle.remove()
        return cls(hidden, rest)

    @torch.no_grad()
    def run(self, block: nn.Module) -> list[Tensor]:
        """block's outputs on every batch."""
        return [block(x, *args, **kw) for x, (args, kw) in zip(self.hidden, self.rest, strict=True)]

    def advance(self, block: nn.Module) -> None:
        """Become the next block's inputs: block's outputs (with its weights as they are now)."""
        self.hidden = self.run(block)


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The nn.Linear modules of a block by name, in forward order (attention, then MLP)."""
    return {name: m for name, m in block.named_modules() if type(m) is nn.Linear}


@contextmanager
def linear_inputs(
    linears: dict[str, nn.Linear], sink: Callable[[str, Tensor], None]
) -> Iterator[None]:
    """While open, every forward of a Linear in linears hands (name, its input as (N, in))
    to sink."""

    def hook(name: str) -> Callable[..., None]:
        return lambda _m, args: sink(name, args[0].reshape(-1, args[0].shape[-1]))

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def hessians(inputs: BlockInputs, block: nn.Module) -> dict[str, tuple[Tensor, int]]:
    """(H = 2 X^T X / n, n) of the inputs X (n calibration tokens, float64 sums) of each Linear
    of block (block_linears' names) that calibration tokens reached: an MoE expert no token was
    routed to has no inputs, hence no H, and is left out."""
    linears = block_linears(block)
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def add(name: str, x: Tensor) -> None:
        x = x.double()
        sums[name] = sums.get(name, 0) + x.T @ x
        counts[name] = counts.get(name, 0) + x.shape[0]

    with linear_inputs(linears, add):
        inputs.run(block)
    return {n: ((2 * sums[n] / counts[n]).float(), counts[n]) for n in sums if counts[n]}


def linear_inputs_of(inputs: BlockInputs, block: nn.Module) -> dict[str, Tensor]:
    """Every calibration input (N, in) of each Linear of block (block_linears' names)."""
    seen: dict[str, list[Tensor]] = {}
    with linear_inputs(block_linears(block), lambda name, x: seen.setdefault(name, []).append(x)):
        inputs.run(block)
    return {name: torch.cat(xs) for name, xs in seen.items()}
