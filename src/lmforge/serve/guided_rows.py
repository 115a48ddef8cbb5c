"""Structured outputs in the engine: each guided row's logits masked to what its grammar allows,
and its guide moved past each token it emits.

A row whose params carry a Guide (constrain/) keeps its guide state on the Row. Before sampling,
its logits outside the allowed tokens become -inf (its stop tokens are allowed exactly when the
grammar accepts the answer so far, even one whose text the grammar could take elsewhere), after
the history rules and before logit_bias, temperature, top-k/top-p or greedy; logprobs stay the
raw model's. When the rules ban every allowed token (a min_tokens ban on the stop token where
only the stop token may come, say), the grammar wins: the row's raw logits are masked instead.
An answer the grammar accepts and cannot extend ends at once with finish_reason "stop", stop
token or not (so ignore_eos and min_tokens cannot make it loop).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmforge.constrain.rows import is_complete, masked_logits, next_state, write_allowed
from lmforge.serve.request_book import Row


def guided_logits(rows: list[Row], ruled: Tensor, raw: Tensor) -> Tensor:
    """`ruled` (B, V) with each guided row's disallowed tokens at -inf; `ruled` itself when no
    row is guided. `raw` is the model's logits, the fallback when the rules left nothing."""
    guided = [i for i, row in enumerate(rows) if row.guide_state is not None]
    if not guided:
        return ruled
    allow = torch.empty((len(guided), ruled.shape[-1]), dtype=torch.bool)
    for j, i in enumerate(guided):
        row = rows[i]
        write_allowed(allow[j], row.params.guide.tokens, row.guide_state, row.stops)
    return masked_logits(ruled, raw, guided, allow)


def advance_guide(row: Row, token: int) -> bool:
    """Moves the row's guide past `token` (a stop token leaves it); True when the answer is
    complete: accepted, and no token can extend it."""
    if row.guide_state is None or token in row.stops:
        return False
    guide = row.params.guide
    row.guide_state = next_state(guide, row.guide_state, token, row.generated - 1)
    return is_complete(guide.tokens, row.guide_state)
