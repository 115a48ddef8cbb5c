"""Where each token sits and what it may attend to: positions of packed documents and
left-padded rows, and the boolean attention masks (None where SDPA's fast path applies).

Shapes: B batch, T sequence length.
"""

from __future__ import annotations

import torch
from torch import Tensor


def doc_positions(doc_ids: Tensor) -> Tensor:
    """Position of each token inside its document: restarts at 0 where doc_ids changes. (B, T)"""
    T = doc_ids.size(1)
    t = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)  # (B, T)
    new_doc = torch.ones_like(doc_ids, dtype=torch.bool)
    new_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    doc_start = torch.where(new_doc, t, 0).cummax(dim=1).values  # (B, T)
    return t - doc_start


def pad_positions(pad_mask: Tensor, start_pos: int) -> Tensor:
    """Positions of the tokens from start_pos on, counted from each row's first token. (B, T)

    pad_mask (B, start_pos + T) is 1 at tokens and 0 at padding; padding gets position 0.
    """
    pos = pad_mask.long().cumsum(dim=1) - 1  # (B, T_k) real tokens before each, minus one
    return pos[:, start_pos:].clamp(min=0)


def attention_mask(
    T: int,
    start_pos: int,
    doc_ids: Tensor | None,
    sliding_window: int | None,
    device: torch.device,
    pad_mask: Tensor | None = None,
    causal: bool = True,
) -> Tensor | None:
    """Boolean mask (B|1, 1, T, start_pos + T), True = may attend; None = plain causal (or, for
    an encoder, everything).

    None lets SDPA use is_causal=True (or no mask at all for a single decoded token), which is the
    fast path. A mask is built only for packed documents, padding (pad_mask (B, start_pos + T),
    0 = pad), sliding windows longer than the window, and multi-token steps after a cached prefix.
    An encoder's (causal=False) pad mask only hides padding keys, as BERT's attention_mask does.
    """
    if not causal:
        return _encoder_mask(T, doc_ids, device, pad_mask)
    T_k = start_pos + T
    windowed = sliding_window is not None and T_k > sliding_window
    if doc_ids is None and pad_mask is None and not windowed and (start_pos == 0 or T == 1):
        return None
    q_pos = torch.arange(start_pos, T_k, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(T_k, device=device)[None, :]  # (1, T_k)
    mask = k_pos <= q_pos  # (T, T_k) causal
    if windowed:
        mask = mask & (q_pos - k_pos < sliding_window)
    if doc_ids is not None:
        mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])  # (B, T, T) same document
    if pad_mask is not None:  # nobody attends to padding; a pad query sees itself, so that no
        # row is all-masked (SDPA would give NaN there, and 0 * NaN reaches the real tokens)
        mask = (mask & pad_mask.bool()[:, None, :]) | (k_pos == q_pos)  # (B, T, T_k)
    return mask.unsqueeze(-3)


def _encoder_mask(
    T: int, doc_ids: Tensor | None, device: torch.device, pad_mask: Tensor | None
) -> Tensor | None:
    """Bidirectional mask: same document (packed rows) and not a padding key; None = all."""
    if doc_ids is None and pad_mask is None:
        return None
    mask = torch.ones(1, T, T, dtype=torch.bool, device=device)
    if doc_ids is not None:
        mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])  # (B, T, T)
    if pad_mask is not None:
        mask = mask & pad_mask.bool()[:, None, :]  # (B, T, T)
    return mask.unsqueeze(-3)
