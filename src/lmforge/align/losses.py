"""Alignment losses as pure functions of small tensors (no model inside), each unit-tested.

- bradley_terry_loss: reward model training, -log sigmoid(r_chosen - r_rejected).
- dpo_loss: Direct Preference Optimization (Rafailov et al., 2023), sigmoid (optionally
  conservative, label-smoothed), hinge (SLiC) or IPO (Azar et al., 2023; per-token log-ratios)
  form, from summed response log-probs of the policy and of a frozen reference.
- simpo_loss: SimPO (Meng et al., 2024), reference-free: beta * the length-normalised log-prob
  margin must exceed a target margin gamma.
- orpo_odds_ratio_loss: ORPO's (Hong et al., 2024) odds-ratio term, -log sigmoid(log odds ratio)
  of length-normalised log-probs; the method adds it, times lambda, to the chosen replies' NLL.
- sequence_logps / token_logps: log-probs of the labelled tokens (the response) of each row.
- PPO (Schulman et al., 2017) with a KL-penalized reward as in Ouyang et al. (2022): gae,
  ppo_policy_loss (the clipped surrogate), value_loss (clipped), masked_mean.
- kto_loss: KTO (Ethayarajh et al., 2024) on unpaired desirable/undesirable completions, each
  log-ratio judged against a batch estimate of the KL to the reference (TRL's KTOTrainer).
- GRPO (Shao et al., 2024, DeepSeekMath): group_advantages (each answer's reward against its
  prompt's group; scale "none" is Dr. GRPO, Liu et al., 2025) and grpo_loss (the clipped ratio
  with DAPO's optional clip-higher, a k3 KL to the reference, and TRL's grpo/bnpo/dr_grpo sums).
"""

from __future__ import annotations

import math
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
    kind: Literal["sigmoid", "hinge", "ipo"] = "sigmoid",
    lengths: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """(mean loss, chosen rewards, rejected rewards) of pairs; inputs are (B,) log-probs.

    The implicit reward of a response is beta * (log pi(y|x) - log pi_ref(y|x)). sigmoid:
    -log sigmoid(reward margin); with label_smoothing eps (conservative DPO, Mitchell 2023, as
    TRL's sigmoid loss had it) the preference is taken as flipped with probability eps,
    -(1 - eps) log sigmoid(m) - eps log sigmoid(-m), so the margin settles where
    sigmoid(m) = 1 - eps instead of growing without bound. hinge (SLiC, Zhao et al., 2023):
    relu(1 - reward margin). ipo: (h - 1 / (2 beta))^2 where h is the margin of the log-ratios
    without beta, each divided by its reply's token count (lengths (B, 2), needed for ipo), which
    regresses the margin to a fixed target instead of pushing it to infinity. Per token as TRL's
    DPOTrainer (its IPO authors' form): a summed margin would make the target's scale, and so
    beta's meaning, depend on how long the replies are.
    """
    if label_smoothing and kind != "sigmoid":
        raise ValueError(f"label_smoothing applies to the sigmoid loss, not {kind!r}")
    chosen_ratio = policy_chosen.float() - ref_chosen.float()
    rejected_ratio = policy_rejected.float() - ref_rejected.float()
    margin = beta * (chosen_ratio - rejected_ratio)
    if kind == "sigmoid":
        eps = label_smoothing
        loss = -(1.0 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin)
    elif kind == "hinge":
        loss = torch.relu(1.0 - margin)
    elif kind == "ipo":
        if lengths is None:
            raise ValueError("the IPO loss needs the replies' token counts (lengths)")
        n = lengths.float().clamp(min=1.0)
        h = chosen_ratio / n[:, 0] - rejected_ratio / n[:, 1]
        loss = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss kind {kind!r} (sigmoid | hinge | ipo)")
    return loss.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def simpo_loss(
    chosen_avg: Tensor, rejected_avg: Tensor, beta: float, gamma: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(mean loss, chosen rewards, rejected rewards); inputs are (B,) per-token mean log-probs.

    The reward of a reply is beta * its mean token log-prob, so no reference model is needed and
    long replies are not favoured; -log sigmoid(reward margin - gamma) keeps pushing until the
    margin clears gamma by a few units.
    """
    chosen_r, rejected_r = beta * chosen_avg.float(), beta * rejected_avg.float()
    loss = -F.logsigmoid(chosen_r - rejected_r - gamma)
    return loss.mean(), chosen_r.detach(), rejected_r.detach()


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, switching form at -log 2 so neither branch loses precision."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_odds_ratio_loss(chosen_avg: Tensor, rejected_avg: Tensor) -> tuple[Tensor, Tensor]:
    """(mean -log sigmoid(log odds ratio), log odds ratios (B,)) of per-token mean log-probs.

    odds(y) = p / (1 - p) with p = exp(mean log-prob); the log ratio odds(chosen) / odds(rejected)
    penalises the rejected reply only mildly once it is unlikely, unlike a raw probability ratio.
    Mean log-probs are clamped just below 0 so a reply the model is certain of stays finite.
    """
    chosen = chosen_avg.float().clamp(max=-1e-6)
    rejected = rejected_avg.float().clamp(max=-1e-6)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return -F.logsigmoid(log_odds).mean(), log_odds.detach()


def sequence_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed log-prob (fp32) of each row's labels (B, T) under logits (B, T, V); -100 skipped."""
    return token_logps(logits, labels).sum(-1)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over the positions where mask is true (0 when there are none)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def whiten(x: Tensor) -> Tensor:
    """x (N,) shifted to mean 0 and scaled to std 1 (unbiased); only centred when N < 2 or all
    equal, so a constant batch carries no signal instead of dividing by zero."""
    centred = x.float() - x.float().mean()
    if x.numel() < 2:
        return centred
    return centred / (centred.std() + 1e-8)


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation over each row's contiguous action span (B, T).

    rewards, values: (B, T), meaningful where mask is true; the value after the last action
    is 0 (the episode ends). Returns (advantages, returns = advantages + values), 0 off the mask.
    """
    mask = mask.to(values.dtype)
    adv = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    T = values.size(1)
    for t in reversed(range(T)):
        nxt_mask = mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        nxt_value = values[:, t + 1] * nxt_mask if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nxt_value - values[:, t]
        last = delta + gamma * lam * nxt_mask * last
        adv[:, t] = last * mask[:, t]
    return adv, (adv + values) * mask


def ppo_policy_loss(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, clip: float
) -> tuple[Tensor, Tensor]:
    """(clipped surrogate loss, fraction of actions clipped) over masked actions (B, T)."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac.detach()


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float
) -> Tensor:
    """Clipped value loss 0.5 * max((v - R)^2, (v_clipped - R)^2) over masked positions."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    worst = torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
    return 0.5 * masked_mean(worst, mask)


def token_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-prob (fp32) of each label (B, T) under logits (B, T, V); 0 where the label is -100."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * (labels != IGNORE_INDEX)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl_policy_logps: Tensor,
    kl_ref_logps: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """(mean loss, implicit rewards (B,), reference point z0) of unpaired examples (KTO).

    Inputs are (B,) summed completion log-probs; desirable (B,) bool is each example's label;
    kl_* are the log-probs of mismatched completions (another example's completion after this
    prompt). z0 = the batch mean of their policy-minus-reference log-ratios, clamped at 0 and
    detached: an estimate of KL(policy || reference) that sets where a completion counts as
    better or worse than expected. Each desirable example costs w_d (1 - sigmoid(beta (r - z0))),
    each undesirable one w_u (1 - sigmoid(beta (z0 - r))), r its log-ratio (Ethayarajh et al.,
    2024, eq. 7, as TRL's KTOTrainer with loss_type="kto"); the mean runs over the whole batch.
    """
    ratio = policy_logps.float() - ref_logps.float()
    z0 = (kl_policy_logps.float() - kl_ref_logps.float()).mean().detach().clamp(min=0)
    want = desirable.bool()
    losses = torch.where(
        want,
        desirable_weight * (1.0 - torch.sigmoid(beta * (ratio - z0))),
        undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - ratio))),
    )
    return losses.mean(), beta * ratio.detach(), z0


def group_advantages(
    rewards: Tensor, group_size: int, scale: Literal["group", "batch", "none"] = "group"
) -> tuple[Tensor, Tensor]:
    """(advantages (N,), zero_std (N // group_size,) bool) of rewards (N,) in consecutive groups.

    advantage = reward - its group's mean, divided by the group's std + 1e-4 (scale "group",
    GRPO), by the whole batch's std + 1e-4 ("batch") or by nothing ("none", Dr. GRPO: dividing
    by the std weights questions that are too easy or too hard up). Stds are unbiased, as TRL's.
    zero_std marks groups whose answers all scored the same: their advantages are 0, no signal.
    It is per group whatever the scaling (TRL's code flags every answer by the batch std under
    "batch", so its frac_reward_zero_std is then 0 or 1, not the share its docs describe).
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.float().view(-1, group_size)
    std = groups.std(1) if group_size > 1 else torch.zeros(groups.size(0))
    adv = groups - groups.mean(1, keepdim=True)
    if scale == "group":
        adv = adv / (std.unsqueeze(1) + 1e-4)
    elif scale == "batch":
        adv = adv / (rewards.float().std() + 1e-4)
    elif scale != "none":
        raise ValueError(f"unknown reward scaling {scale!r} (group | batch | none)")
    return adv.reshape(-1), torch.isclose(std, torch.zeros_like(std))


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    epsilon_low: float,
    epsilon_high: float,
    loss_type: Literal["grpo", "bnpo", "dr_grpo"] = "grpo",
    ref_logps: Tensor | None = None,
    beta: float = 0.0,
    max_completion_length: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss, stats) of answers' token log-probs (B, T) under the policy, at sampling (old) and
    under the reference, with one advantage per answer (B,) and mask (B, T) on answer tokens.

    Per token: -min(ratio * A, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * A), plus
    beta * k3 KL, exp(ref - logp) - (ref - logp) - 1 (unbiased, always >= 0). Summed per token,
    then: grpo, each answer's mean, averaged over answers (a long answer's tokens weigh less);
    bnpo, the mean over every token of the batch; dr_grpo, the sum over the batch divided by
    B * max_completion_length (a constant: no length bias). stats: clip fractions at the low
    and high bound (where the clip takes the gradient away), and the mean KL per token.
    """
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    adv = advantages.float().unsqueeze(1)
    clipped = ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    stats = {
        "clip_low": masked_mean(((ratio < 1.0 - epsilon_low) & (adv < 0)).float(), mask),
        "clip_high": masked_mean(((ratio > 1.0 + epsilon_high) & (adv > 0)).float(), mask),
    }
    if beta:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference's log-probs (ref_logps)")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1.0
        per_token = per_token + beta * kl
        stats["kl"] = masked_mean(kl, mask)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("dr_grpo divides by max_completion_length; pass it")
        loss = (per_token * mask).sum() / (logps.size(0) * max_completion_length)
    else:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r} (grpo | bnpo | dr_grpo)")
    return loss, {k: v.detach() for k, v in stats.items()}
