"""The reward model: the Transformer with a scalar head, trained on pairs with Bradley-Terry.

It is finetune.heads.SequenceClassifier with one output: the last real token of prompt + reply is
pooled into a bias-free Linear(n_embd, 1), so the export is a Hugging Face
*ForSequenceClassification with num_labels=1 whose logit is the reward.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.align.losses import bradley_terry_loss
from lmforge.align.rollout import eval_mode
from lmforge.finetune.heads import SequenceClassifier


def reward_model(lm: nn.Module) -> SequenceClassifier:
    """A one-output classifier over `lm`: its logit is the reward."""
    return SequenceClassifier(lm, 1)


def pair_rewards(model: nn.Module, ids: Tensor, last: Tensor) -> Tensor:
    """Rewards (B, 2) of pair rows ids (B, 2, T) pooled at last (B, 2).

    The batch is cut after its furthest pooled position first: causal attention makes the
    right padding beyond it invisible to every pooled state, and pairs are mostly far shorter
    than train.seq_len (the quickstart's: median 54 of 128 tokens), so a step costs about a
    third less with the same rewards.
    """
    ids = ids[..., : int(last.max()) + 1]
    logits, _ = model(ids.flatten(0, 1), last.flatten())  # (2B, 1)
    return logits.float().view(ids.size(0), 2)


def reward_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """loss_fn for the loop: Bradley-Terry on the pair; logs pair accuracy and reward margin."""
    r = pair_rewards(model, batch["input_ids"], batch["last"])
    margin = (r[:, 0] - r[:, 1]).detach()
    loss = bradley_terry_loss(r[:, 0], r[:, 1])
    return loss, {"pair_acc": (margin > 0).float().mean(), "reward_margin": margin.mean()}


def row_batches(
    rows: dict[str, np.ndarray], batch_size: int, device: torch.device, limit: int | None = None
) -> Iterator[dict[str, Tensor]]:
    """Consecutive batches of rows as tensors on device (at most `limit` batches)."""
    n = len(rows["input_ids"])
    for b, lo in enumerate(range(0, n, batch_size)):
        if limit is not None and b >= limit:
            return
        yield {k: torch.from_numpy(v[lo : lo + batch_size]).to(device) for k, v in rows.items()}


@torch.no_grad()
def evaluate_rewards(
    model: nn.Module,
    rows: dict[str, np.ndarray],
    batch_size: int,
    limit: int | None = None,
    kinds: list[str] | None = None,
) -> dict[str, float]:
    """Held-out Bradley-Terry loss, pairwise accuracy and mean reward margin; with kinds (one per
    row), the accuracy of each kind too (val_pair_accuracy_<kind>)."""
    device = next(model.parameters()).device
    with eval_mode(model):
        batches = row_batches(rows, batch_size, device, limit)
        r = torch.cat([pair_rewards(model, b["input_ids"], b["last"]) for b in batches])
    margin = r[:, 0] - r[:, 1]
    out = {
        "val_loss": float(bradley_terry_loss(r[:, 0], r[:, 1])),
        "val_pair_accuracy": float((margin > 0).float().mean()),
        "val_reward_margin": float(margin.mean()),
    }
    if kinds is not None and limit is None:
        right = (margin > 0).cpu().numpy()
        for kind in sorted(set(kinds)):
            at = np.array([k == kind for k in kinds])
            out[f"val_pair_accuracy_{kind}"] = float(right[at].mean())
    return out
