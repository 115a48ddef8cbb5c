"""Dropout off for preference and RL training (TRL's `disable_dropout=True`).

These losses compare log-probs of the policy in train mode with log-probs scored in eval mode at
the same weights: DPO's reference (the starting model, scored once before training), PPO's rollout
log-probs and values. With dropout on, the two differ before any update (DPO's first loss is not
log 2, PPO's first policy ratio is not 1), which is noise in the very quantity being optimised.
"""

from __future__ import annotations

from torch import nn


def disable_dropout(model: nn.Module) -> None:
    """Sets every dropout rate in model to 0: nn.Dropout modules (residual, embedding, LoRA
    adapter inputs) and the attention-probability rate model.attention passes to SDPA as a float
    attribute `dropout`. The model's config keeps its rate, so the exported config is unchanged.
    """
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        elif isinstance(getattr(m, "dropout", None), float):
            m.dropout = 0.0
