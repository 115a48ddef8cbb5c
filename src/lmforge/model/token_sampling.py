"""Choosing the next token from last-position logits: the sampling rules and the draws.

The usual order: repetition penalty, temperature, top-k, top-p, then a draw (or argmax when
greedy): multinomial from one generator, or Gumbel-max from one generator per row when a
prompt's sample must not depend on its batch. generate(), seq2seq_generate and serve's
batched sampling (serve/sampling.py) share these.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.errors import ConfigError


def apply_repetition_penalty(
    logits: Tensor, history: Tensor, penalty: float, history_mask: Tensor | None = None
) -> Tensor:
    """Make already-seen tokens less likely (CTRL paper / HF): divide positive, multiply negative.

    history (B, T) are the tokens seen; history_mask (B, T), 0 at padding, leaves padding out.
    """
    weight = torch.ones_like(history, dtype=logits.dtype) if history_mask is None else history_mask
    seen = torch.zeros_like(logits).scatter_add_(1, history, weight.to(logits.dtype)) > 0  # (B, V)
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits per row, -inf elsewhere."""
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability is >= p."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V) probability of strictly better tokens
    drop_sorted = mass_before >= p  # the most likely token always has mass_before 0, so it stays
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: Tensor,
    history: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    history_mask: Tensor | None = None,
) -> Tensor:
    """Pick one token per row from last-position logits (B, V); history (B, T) is the context.

    history_mask (B, T): 0 where history is padding (ignored by the repetition penalty).
    generator: one for the whole batch, or one per row, so that a row's draws do not depend on
    which other rows share its batch (see draw_per_row).
    """
    logits = logits.float()
    if repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, history, repetition_penalty, history_mask)
    if greedy or temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    if isinstance(generator, Sequence):
        return draw_per_row(logits, generator)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


def draw_per_row(logits: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
    """One draw from softmax(logits[i]) per row, with row i's randomness from generators[i] alone.

    The Gumbel-max trick: argmax(log p + G), G = -log(-log U), U ~ Uniform(0, 1) is an exact
    sample of p, and each row consumes exactly V uniforms from its own generator per step; so a
    prompt samples the same tokens alone or in any batch. Filtered logits (-inf) never win.
    """
    if len(generators) != logits.size(0):
        raise ValueError(f"{len(generators)} generators for {logits.size(0)} rows")
    u = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    for row, g in zip(u, generators, strict=True):
        row.uniform_(generator=g)  # what torch.rand(V, generator=g) draws
    # in place: a (B, V) temporary per op costs more than the op itself at a serving batch
    gumbel = u.clamp_min_(torch.finfo(u.dtype).tiny).log_().neg_().log_().neg_()  # (B, V)
    return gumbel.add_(F.log_softmax(logits, dim=-1)).argmax(dim=-1)  # (B,)


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None, rp: float) -> None:
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be >= 1 (or unset), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p must be in (0, 1] (or unset), got {top_p}")
    if rp <= 0:
        raise ConfigError(f"repetition_penalty must be > 0 (1 = off), got {rp}")
