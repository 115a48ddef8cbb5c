"""KTO: a policy from unpaired desirable/undesirable completions against a frozen reference.

Each example is encoded as a pair row (align.encode): index 0 is its own prompt + completion,
index 1 the same prompt followed by another example's completion (its KL partner, kl_partners:
drawn once per split, never the example's own text when another exists; TRL shifts completions
within each batch, so a batch's partners there are its own completions). The mismatched rows
estimate KL(policy || reference), the reference point z0 of the loss (losses.kto_loss). So DPO's code
scores both the reference (once, before training: align.dpo.reference_logps) and the policy
(align.dpo.reply_logps; the mismatched rows without gradient, as TRL's), the mismatched rows
included.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.align.config import KTOOptions
from lmforge.align.dpo import reply_logps, score_pairs
from lmforge.align.encode import encode_pairs
from lmforge.align.losses import kto_loss, masked_mean
from lmforge.align.unpaired import Example, label_counts
from lmforge.errors import InputError

# TRL's (and the paper's eq. 8) recommended range of desirable_weight * n_desirable over
# undesirable_weight * n_undesirable
BALANCE_RANGE = (1.0, 4.0 / 3.0)


def encode_unpaired(
    tok: Any, examples: list[Example], seq_len: int, seed: int, split: str = "train"
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """(rows, counts) of unpaired examples.

    rows: input_ids and labels (N, 2, T) (own completion, KL partner's), desirable (N,) bool and
    pair (N,) int64 (the pair an example came from, -1 when none). An example whose own or
    partner's completion is cut away entirely by seq_len is dropped and counted. Fewer than two
    examples (split names them) is an InputError: a lone example would be its own KL partner,
    and z0 its own log-ratio (TRL refuses a batch of one for the same reason).
    """
    if len(examples) < 2:
        raise InputError(
            f"kto: the {split} split holds {len(examples)} example(s), but each needs another "
            "example's completion as its KL partner: give it at least 2 (data, val_data, "
            "eval.val_fraction)"
        )
    partner = kl_partners([e["completion"] for e in examples], seed)
    as_pairs = [
        {"prompt": e["prompt"], "tool_conversation": e.get("tool_conversation"),
         "chosen": e["completion"],
         "rejected": examples[partner[i]]["completion"]}
        for i, e in enumerate(examples)
    ]  # fmt: skip
    rows, stats, indices = encode_pairs(tok, as_pairs, seq_len)
    kept = [examples[i] for i in indices]
    pair_ids: dict[Any, int] = {}
    rows["desirable"] = np.array([e["desirable"] for e in kept], dtype=bool)
    rows["pair"] = np.array(
        [pair_ids.setdefault(e["pair"], len(pair_ids)) if "pair" in e else -1 for e in kept],
        dtype=np.int64,
    )
    counts = label_counts(kept) | {"truncated": stats["truncated"], "dropped": stats["dropped"]}
    return rows, counts


def kl_partners(completions: list[str], seed: int) -> np.ndarray:
    """Index of each example's KL partner, whose completion follows the example's prompt in its
    mismatched row: a seeded shuffle in which each takes the completion before it, then every
    partner whose text is the example's own (a completion given twice) drawn again among the
    examples with another text, when there is one; else the row would score the example itself.

    They are drawn once per split, as the reference scores them once before training. TRL does
    it once too, as it prepares the data (KTOTrainer's _get_kl_dataset): it shifts the
    completions of each batch by one, so a partner there can hold the example's own text."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(completions))
    partner = np.empty(len(completions), dtype=np.int64)
    partner[order] = np.roll(order, 1)
    texts: dict[str, int] = {}
    code = np.array([texts.setdefault(c, len(texts)) for c in completions])
    same = np.flatnonzero(code[partner] == code)
    for text in np.unique(code[same]):
        mine, others = same[code[same] == text], np.flatnonzero(code != text)
        if len(others):
            partner[mine] = rng.choice(others, size=len(mine))
    return partner


def balance_warning(counts: dict[str, int], opts: KTOOptions) -> str | None:
    """A warning when desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    falls outside BALANCE_RANGE (TRL's range; TRL checks it only when the counts differ), with
    the desirable_weight range that would fix it, or when one label has no example at all (no
    weight balances that); None when it is inside."""
    n_des, n_und = counts["desirable"], counts["undesirable"]
    if not (n_des and n_und):
        missing = "undesirable" if n_des else "desirable"
        return (
            f"kto: the training data holds {n_des} desirable and {n_und} undesirable examples: "
            f"with no {missing} one the loss only moves log-ratios one way from z0; add "
            f"{missing} examples (a feedback store: see kto.desirable_min_rating / "
            "kto.undesirable_max_rating)"
        )
    ratio = opts.desirable_weight * n_des / (opts.undesirable_weight * n_und)
    if BALANCE_RANGE[0] <= ratio <= BALANCE_RANGE[1]:
        return None
    low, high = (r * opts.undesirable_weight * n_und / n_des for r in BALANCE_RANGE)
    return (
        f"kto: {n_des} desirable and {n_und} undesirable examples at kto.desirable_weight="
        f"{opts.desirable_weight}, kto.undesirable_weight={opts.undesirable_weight} give a "
        f"weighted ratio of {ratio:.3g}, outside the recommended [1, 4/3]: set "
        f"kto.desirable_weight in [{low:.3g}, {high:.3g}] (or scale kto.undesirable_weight)"
    )


def _kto(logps: Tensor, ref: Tensor, desirable: Tensor, opts: KTOOptions):
    return kto_loss(logps[:, 0], ref[:, 0], desirable, logps[:, 1], ref[:, 1], opts.beta,
                    opts.desirable_weight, opts.undesirable_weight)  # fmt: skip


def kto_logps(model: nn.Module, ids: Tensor, labels: Tensor) -> Tensor:
    """Summed reply log-probs (B, 2) of KTO rows (B, 2, T): the own completions with gradient,
    the KL partners' without (z0 is detached, so their backward would only add zeros), as TRL
    scores its KL completions under no_grad."""
    own = reply_logps(model, ids[:, 0], labels[:, 0])
    with torch.no_grad():
        partner = reply_logps(model, ids[:, 1], labels[:, 1])
    return torch.stack([own, partner], dim=1)


def make_kto_loss(opts: KTOOptions):
    """loss_fn for the loop; logs z0 (kl), the mean reward of each label (0 when the batch has
    none) and the share of examples on their label's side of z0."""

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        logps = kto_logps(model, batch["input_ids"], batch["labels"])
        desirable = batch["desirable"].bool()
        loss, rewards, z0 = _kto(logps, batch["ref_logps"], desirable, opts)
        right = (rewards > opts.beta * z0) == desirable
        return loss, {
            "kl": z0,
            "desirable_reward": masked_mean(rewards, desirable),
            "undesirable_reward": masked_mean(rewards, ~desirable),
            "label_acc": right.float().mean(),
        }

    return loss_fn


def reward_auc(desirable: Tensor, undesirable: Tensor) -> float:
    """The chance a random desirable example's reward exceeds a random undesirable one's (ties
    count half): how well the implicit reward tells the labels apart, whatever threshold.
    Mann-Whitney U from tied-averaged ranks: O(n log n) memory-light, where comparing every pair
    would hold an n_desirable x n_undesirable matrix (400 MB at 10k each)."""
    scores = torch.cat([desirable, undesirable]).double()
    _, where, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # 1-based rank of each distinct value's last copy
    ranks = (ends - (counts - 1) / 2.0)[where]  # ties share their mean rank
    n_d, n_u = len(desirable), len(undesirable)
    u = ranks[:n_d].sum() - n_d * (n_d + 1) / 2.0  # pairs a desirable wins, ties half
    return float(u / (n_d * n_u))


def pair_accuracy(rewards: Tensor, desirable: Tensor, pair: Tensor) -> float | None:
    """Share of pairs (both halves held out) whose desirable reward exceeds the undesirable's,
    DPO's preference accuracy; None when no pair is complete."""
    wins = []
    for p in pair[pair >= 0].unique():
        mine = pair == p
        good, bad = rewards[mine & desirable], rewards[mine & ~desirable]
        if len(good) and len(bad):
            wins.append(float(good[0] > bad[0]))
    return sum(wins) / len(wins) if wins else None


@torch.no_grad()
def evaluate_kto(
    model: nn.Module,
    rows: dict[str, np.ndarray],
    batch_size: int,
    opts: KTOOptions,
    limit: int | None = None,
) -> dict[str, float]:
    """Held-out KTO loss (z0 over all scored rows), z0, mean implicit reward of each label and
    their margin, reward AUC, pairwise accuracy (when pairs), and the desirable-over-undesirable
    mean log-prob margin of the policy (val_logp_margin) beside the reference's."""
    logp, _ = score_pairs(model, rows, batch_size, limit)
    n = len(logp)
    ref = torch.from_numpy(rows["ref_logps"][:n]).to(logp.device).float()
    desirable = torch.from_numpy(rows["desirable"][:n]).to(logp.device)
    loss, rewards, z0 = _kto(logp, ref, desirable, opts)
    out = {"val_loss": float(loss), "val_kl": float(z0)}
    if desirable.any() and (~desirable).any():
        good, bad = rewards[desirable], rewards[~desirable]
        out.update(
            val_desirable_reward=float(good.mean()),
            val_undesirable_reward=float(bad.mean()),
            val_reward_margin=float(good.mean() - bad.mean()),
            val_reward_auc=reward_auc(good, bad),
            val_logp_margin=float(logp[desirable, 0].mean() - logp[~desirable, 0].mean()),
            ref_logp_margin=float(ref[desirable, 0].mean() - ref[~desirable, 0].mean()),
        )
    paired = pair_accuracy(rewards, desirable, torch.from_numpy(rows["pair"][:n]).to(logp.device))
    if paired is not None:
        out["val_pair_accuracy"] = paired
    return out
