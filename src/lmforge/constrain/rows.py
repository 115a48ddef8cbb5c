"""A guided answer, token by token: the mask of what may come next, the logits under it, and the
move past each token drawn. The rules serve's guided rows follow, for offline generation.

Stop tokens are allowed exactly when the grammar accepts the answer so far (even where its text
could go on elsewhere); the mask applies to the logits after the history rules, and where those
rules ban every allowed token the grammar wins: the raw logits are masked instead. An answer the
grammar accepts and cannot extend is complete, stop token or not.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from lmforge.constrain.guide import Guide
from lmforge.constrain.masker import GuideState, TokenGuide


def masked_logits(ruled: Tensor, raw: Tensor, rows: Sequence[int], allow: Tensor) -> Tensor:
    """`ruled` (B, V) as floats with row rows[j]'s tokens outside allow[j] at -inf (a new
    tensor); a row the rules left nothing under its mask takes `raw`'s logits under it."""
    index = torch.tensor(list(rows), dtype=torch.long, device=ruled.device)
    allow = allow.to(ruled.device)
    out = ruled.float().clone()
    masked = out.index_select(0, index).masked_fill(~allow, float("-inf"))
    empty = ~torch.isfinite(masked).any(dim=-1)
    if bool(empty.any()):  # one sync per step with guided rows
        fallback = raw.float().index_select(0, index).masked_fill(~allow, float("-inf"))
        masked = torch.where(empty[:, None], fallback, masked)
    out[index] = masked
    return out


def write_allowed(
    into: Tensor, tokens: TokenGuide, state: GuideState, stops: Iterable[int]
) -> None:
    """Writes into `into` (bool (V,)) the next tokens the grammar allows at `state`, the stop
    tokens included exactly where the answer may end; ids past the tokenizer's (a padded
    embedding) never."""
    mask = tokens.allowed(state)  # cached per state: copied here, never written
    vocab = into.numel()
    n = min(mask.numel(), vocab)
    into[:n] = mask[:n]
    into[n:] = False
    into[[t for t in stops if t < vocab]] = tokens.accepts(state)


class GuidedRow:
    """One answer under a compiled Guide: model.generate's RowConstraint for structured outputs.

    `length` counts the tokens it moved past; once `complete`, the answer is those tokens.
    """

    def __init__(self, guide: Guide, stop_tokens: Iterable[int]) -> None:
        self.guide = guide
        self.stops = frozenset(stop_tokens)
        self.state: GuideState = guide.tokens.start
        self.length = 0
        self.complete = False

    def allowed(self, vocab_size: int) -> Tensor:
        """Bool (vocab_size,) of the next tokens the grammar allows (a new tensor): write_allowed."""
        allow = torch.empty(vocab_size, dtype=torch.bool)
        write_allowed(allow, self.guide.tokens, self.state, self.stops)
        return allow

    def advance(self, token: int) -> bool:
        """Moves past `token` (a stop token ends the answer and leaves the state); True when the
        answer is complete."""
        if token in self.stops:
            return False
        self.state = next_state(self.guide, self.state, token, self.length)
        self.length += 1
        self.complete = is_complete(self.guide.tokens, self.state)
        return self.complete


def next_state(guide: Guide, state: GuideState, token: int, written: int) -> GuideState:
    """The guide state after `token`; a token the grammar does not allow there is a RuntimeError
    saying why (the mask left the draw nothing, or a caller drew outside it). written: the
    answer's tokens before this one, for the message."""
    tokens = guide.tokens
    after = tokens.advance(state, token)
    if after is None:
        if not bool(tokens.allowed(state).any()):  # the mask left the draw nothing
            raise RuntimeError(
                f"the {guide.kind} constraint cannot go on after {written} tokens: no token of "
                "this tokenizer's vocabulary continues it (does it need a character the "
                "vocabulary cannot write?)"
            )
        raise RuntimeError(f"token {token} is outside the {guide.kind} constraint")
    return after


def is_complete(tokens: TokenGuide, state: GuideState) -> bool:
    """Whether an answer at `state` is done: accepted, and no token can extend it."""
    return tokens.accepts(state) and not bool(tokens.allowed(state).any())
