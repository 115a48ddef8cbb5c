"""Reference-free preference methods, SimPO and ORPO: the policy's own per-token mean log-probs.

Neither needs a reference model, so nothing is scored before training and one copy of the
weights is held. Both judge a reply by its mean token log-prob (length-normalised, so a long
reply earns nothing for its length). SimPO pushes beta * the mean log-prob margin past gamma;
ORPO is SFT on the chosen replies plus lambda times an odds-ratio term against the rejected ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from torch import Tensor, nn

from lmforge.align.dpo import chosen_nll, pair_logps, per_token, reply_lengths, score_pairs
from lmforge.align.losses import orpo_odds_ratio_loss, simpo_loss


@dataclass(frozen=True)
class RefFreeSpec:
    """Which method and its settings: SimPO's beta and target margin gamma, ORPO's lambda."""

    method: Literal["simpo", "orpo"]
    beta: float = 2.0
    gamma: float = 1.0
    lam: float = 0.1


def ref_free_loss(spec: RefFreeSpec, summed: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """(loss, per-pair reward margin (B,)) of summed reply log-probs and reply lengths (B, 2).

    simpo: the SimPO loss on per-token mean log-probs, margin beta * (mean chosen - mean
    rejected). orpo: the chosen replies' NLL averaged over all their tokens in the batch
    (dpo.chosen_nll, as TRL's ORPOTrainer; TRL also counts the prompt's tokens, here only the
    reply's are) + lam * the odds-ratio loss on per-token means, margin the log odds ratio.
    """
    mean = per_token(summed, lengths)
    chosen, rejected = mean[:, 0], mean[:, 1]
    if spec.method == "simpo":
        loss, chosen_r, rejected_r = simpo_loss(chosen, rejected, spec.beta, spec.gamma)
        return loss, chosen_r - rejected_r
    if spec.method == "orpo":
        odds_loss, log_odds = orpo_odds_ratio_loss(chosen, rejected)
        return chosen_nll(summed, lengths) + spec.lam * odds_loss, log_odds
    raise ValueError(f"unknown reference-free method {spec.method!r} (simpo | orpo)")


def make_ref_free_loss(spec: RefFreeSpec):
    """loss_fn for the loop; logs the reward margin, preference accuracy and mean log-probs."""

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        summed = pair_logps(model, batch["input_ids"], batch["labels"])
        lengths = reply_lengths(batch["labels"])
        loss, margin = ref_free_loss(spec, summed, lengths)
        mean = per_token(summed.detach(), lengths)
        return loss, {
            "reward_margin": margin.mean(),
            "pref_acc": (mean[:, 0] > mean[:, 1]).float().mean(),
            "chosen_mean_logp": mean[:, 0].mean(),
            "rejected_mean_logp": mean[:, 1].mean(),
        }

    return loss_fn


def evaluate_ref_free(
    model: nn.Module, rows: dict[str, np.ndarray], batch_size: int, spec: RefFreeSpec,
    limit: int | None = None,
) -> dict[str, float]:  # fmt: skip
    """Held-out loss, preference accuracy (mean log-prob of chosen above rejected), reward
    margin, and the summed chosen-over-rejected log-prob margin (val_logp_margin, as DPO's)."""
    summed, lengths = score_pairs(model, rows, batch_size, limit)
    mean = per_token(summed, lengths)
    loss, margin = ref_free_loss(spec, summed, lengths)
    return {
        "val_loss": float(loss),
        "val_pref_accuracy": float((mean[:, 0] > mean[:, 1]).float().mean()),
        "val_reward_margin": float(margin.mean()),
        "val_logp_margin": float((summed[:, 0] - summed[:, 1]).mean()),
        "val_chosen_mean_logp": float(mean[:, 0].mean()),
    }
