"""Masked-language-model objective (BERT): corrupt a share of tokens, predict the originals.

Of the tokens chosen (each with probability `probability`, never a special token such as the
document separator, padding or [MASK] itself), 80% become [MASK], 10% a random ordinary token and
10% stay as they are; the loss is cross-entropy on the chosen positions only (IGNORE_INDEX
elsewhere). Training draws fresh masks every step; validation masks each val batch with its own
seeded CPU generator, so every evaluation, on any device, scores the same masked tokens and
losses are comparable.
With a tokenizer whose template opens a text with [CLS] (MaskSpec.start_ids), every window starts
with it as BERT's pretraining inputs do (its first token gives way), so the first position a
classifier pools has been trained as [CLS]; documents inside a window stay [SEP]-separated.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmforge.model.chunked_loss import IGNORE_INDEX


@dataclass(frozen=True)
class MaskSpec:
    """What masking needs from the tokenizer: the [MASK] id and the ids never to mask."""

    mask_id: int
    special_ids: tuple[int, ...]
    vocab_size: int
    probability: float = 0.15
    start_ids: tuple[int, ...] = ()  # the template's opening specials ([CLS]), if any

    def replaceable_ids(self, device: torch.device) -> Tensor:
        """The ordinary token ids a random replacement is drawn from."""
        keep = torch.ones(self.vocab_size, dtype=torch.bool, device=device)
        keep[[i for i in self.special_ids if i < self.vocab_size]] = False
        keep[self.mask_id] = False
        return keep.nonzero().squeeze(1)


def mask_tokens(
    ids: Tensor, spec: MaskSpec, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """(corrupted input ids, labels) for MLM; labels are IGNORE_INDEX where nothing is predicted.

    pad_mask-free: padding must be one of spec.special_ids (it is, for lmforge tokenizers).
    """
    device = ids.device
    start, never_ids, pool = _device_ids(spec, device)
    if spec.start_ids:
        ids = ids.clone()
        ids[:, : len(spec.start_ids)] = start

    def uniform(shape: torch.Size) -> Tensor:
        return torch.rand(shape, generator=generator, device=device)

    never = torch.isin(ids, never_ids)
    chosen = (uniform(ids.shape) < spec.probability) & ~never
    labels = torch.where(chosen, ids, IGNORE_INDEX)
    roll = uniform(ids.shape)
    to_mask = chosen & (roll < 0.8)
    to_random = chosen & (roll >= 0.8) & (roll < 0.9)
    pick = (uniform(ids.shape) * len(pool)).long().clamp(max=len(pool) - 1)
    corrupted = torch.where(to_mask, spec.mask_id, ids)
    corrupted = torch.where(to_random, pool[pick], corrupted)
    return corrupted, labels


@functools.lru_cache(maxsize=8)
def _device_ids(spec: MaskSpec, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """spec's ids as tensors on device, built once rather than every training step (the pool's
    nonzero() waits for the device): (the window's opening ids, ids never chosen, ids a random
    replacement is drawn from)."""
    start = torch.tensor(spec.start_ids, dtype=torch.long, device=device)
    never = torch.tensor([*spec.special_ids, spec.mask_id], device=device)
    return start, never, spec.replaceable_ids(device)


def make_mlm_loss(spec: MaskSpec):
    """loss_fn for the one loop: masks the batch's input_ids afresh, masked-token cross-entropy.

    A batch that already carries MLM labels (validation, masked once with a fixed seed) is used
    as it is.
    """

    def mlm_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
        if batch.get("mlm_labels") is not None:
            ids, labels = batch["input_ids"], batch["mlm_labels"]
        else:
            ids, labels = mask_tokens(batch["input_ids"], spec)
        loss = model(ids, doc_ids=batch.get("doc_ids"), labels=labels)
        return loss, {"masked_tokens": (labels != IGNORE_INDEX).sum().float()}

    return mlm_loss


def masked_val_batch(batch: dict[str, Tensor], spec: MaskSpec, seed: int) -> dict[str, Tensor]:
    """A validation batch masked once, reproducibly (the same masks at every evaluation).

    The masks are drawn on CPU and moved: a CUDA generator draws other numbers from the same
    seed, so masking on the batch's device would give CPU and GPU runs different val_loss.
    """
    ids = batch["input_ids"]
    corrupted, labels = mask_tokens(ids.cpu(), spec, torch.Generator().manual_seed(seed))
    return {**batch, "input_ids": corrupted.to(ids.device), "mlm_labels": labels.to(ids.device)}
