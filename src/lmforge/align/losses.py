"""Alignment losses as pure functions of small tensors (no model inside), each unit-tested.

- bradley_terry_loss: reward model training, -log sigmoid(r_chosen - r_rejected).
- dpo_loss: Direct Preference Optimization (Rafailov et al., 2023), sigmoid or IPO (Azar et al.,
  2023) form, from summed response log-probs of the policy and of a frozen reference.
- sequence_logps: the summed log-prob of the labelled tokens of each row (the response).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.model.transformer import IGNORE_INDEX


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor) -> Tensor:
    """Mean -log sigmoid(r_chosen - r_rejected) over pairs (B,)."""
    return -F.logsigmoid(r_chosen.float() - r_rejected.float()).mean()


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    kind: Literal["sigmoid", "ipo"] = "sigmoid",
) -> tuple[Tensor, Tensor, Tensor]:
    """(mean loss, chosen rewards, rejected rewards) of pairs; inputs are (B,) log-probs.

    The implicit reward of a response is beta * (log pi(y|x) - log pi_ref(y|x)). sigmoid:
    -log sigmoid(reward margin). ipo: (h - 1 / (2 beta))^2 where h is the margin of the log-ratios
    without beta, which regresses the margin to a fixed target instead of pushing it to infinity.
    """
    chosen_ratio = policy_chosen.float() - ref_chosen.float()
    rejected_ratio = policy_rejected.float() - ref_rejected.float()
    h = chosen_ratio - rejected_ratio
    if kind == "sigmoid":
        loss = -F.logsigmoid(beta * h)
    elif kind == "ipo":
        loss = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss kind {kind!r} (sigmoid | ipo)")
    return loss.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def sequence_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed log-prob (fp32) of each row's labels (B, T) under logits (B, T, V); -100 skipped."""
    mask = labels != IGNORE_INDEX
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (picked * mask).sum(-1)
