"""DPO: the policy's response log-probs against a frozen reference's, precomputed once.

The reference is scored before training (by default the starting model itself, the usual SFT
reference), so training holds one model in memory and a LoRA policy needs no second copy of the
base. Rows then carry `ref_logps` (N, 2) next to the pair tokens (align.encode).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.align.encode import refuse_other_vocab
from lmforge.align.losses import dpo_loss, sequence_logps
from lmforge.align.reward import row_batches
from lmforge.align.rollout import eval_mode
from lmforge.model.transformer import IGNORE_INDEX


def reply_logps(model: nn.Module, ids: Tensor, labels: Tensor) -> Tensor:
    """Summed reply log-probs (N,) of rows ids/labels (N, T).

    The batch is cut after its last labelled position first (as reward.pair_rewards): causal
    attention makes the right padding beyond it invisible to every labelled position, and replies
    are mostly far shorter than train.seq_len, so the forward and the (N, T, V) log-softmax
    shrink with the same log-probs.
    """
    labelled = (labels != IGNORE_INDEX).any(0).nonzero()  # positions labelled in some row
    end = int(labelled.max()) + 1 if len(labelled) else 1
    logits = model(ids[:, :end])  # (N, end, V)
    return sequence_logps(logits, labels[:, :end])


def pair_logps(model: nn.Module, ids: Tensor, labels: Tensor) -> Tensor:
    """Summed reply log-probs (B, 2) of pair rows ids/labels (B, 2, T), in one forward."""
    return reply_logps(model, ids.flatten(0, 1), labels.flatten(0, 1)).view(-1, 2)


def reply_lengths(labels: Tensor) -> Tensor:
    """Token counts (B, 2) of the replies labelled in pair rows labels (B, 2, T)."""
    return (labels != IGNORE_INDEX).sum(-1)


def per_token(summed: Tensor, lengths: Tensor) -> Tensor:
    """Summed reply log-probs (B, 2) divided by their replies' token counts lengths (B, 2): the
    per-token mean log-prob SimPO and ORPO judge a reply by (align.ref_free)."""
    return summed / lengths.clamp(min=1)


def chosen_nll(summed: Tensor, lengths: Tensor) -> Tensor:
    """The chosen replies' negative log-likelihood averaged over all the batch's chosen tokens,
    so a long reply weighs by its length, as TRL averages it: DPOTrainer's RPO term (rpo_alpha,
    now loss_type "sft": cross-entropy over the flattened chosen tokens) and ORPOTrainer's NLL.
    summed, lengths: (B, 2) summed reply log-probs and token counts, chosen first."""
    return -summed[:, 0].float().sum() / lengths[:, 0].sum().clamp(min=1)


def load_reference(path: Path, tok: Any) -> nn.Module:
    """dpo.reference's model (a model directory or a training stage's, as --model), refused
    before its weights load unless its tokenizer gives the policy's (tok's) token ids."""
    from lmforge.artifacts import require_artifact
    from lmforge.model.convert import load_pretrained, resolve_model_dir
    from lmforge.tokenizer.files import TokenizerFiles

    path = resolve_model_dir(path)
    require_artifact(path, ["config.json", "tokenizer.json"], hint=(
        "lmforge finetune --model DIR --data FILE --out DIR, then dpo.reference=DIR; or unset "
        "dpo.reference (the reference is then the starting model)"))  # fmt: skip
    refuse_other_vocab(
        TokenizerFiles.load(path), tok, "dpo.reference",
        "use a model tuned from the policy's base, or leave dpo.reference unset (the start)",
    )  # fmt: skip
    return load_pretrained(path, quantized="dequantize")


@torch.no_grad()
def score_pairs(
    model: nn.Module, rows: dict[str, np.ndarray], batch_size: int, limit: int | None = None
) -> tuple[Tensor, Tensor]:
    """(summed reply log-probs, reply lengths), each (N, 2), of the first `limit` batches of pair
    rows (all when None), scored in eval mode; the model's mode is restored after."""
    device = next(model.parameters()).device
    logps, lengths = [], []
    pairs = {k: rows[k] for k in ("input_ids", "labels")}
    with eval_mode(model):
        for b in row_batches(pairs, batch_size, device, limit):
            logps.append(pair_logps(model, b["input_ids"], b["labels"]))
            lengths.append(reply_lengths(b["labels"]))
    return torch.cat(logps), torch.cat(lengths)


def reference_logps(model: nn.Module, rows: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
    """Reply log-probs (N, 2) of every pair row under the (frozen) reference model."""
    return score_pairs(model, rows, batch_size)[0].cpu().numpy().astype(np.float32)


Kind = Literal["sigmoid", "hinge", "ipo"]


def make_dpo_loss(beta: float, kind: Kind, sft_weight: float = 0.0, label_smoothing: float = 0.0):
    """loss_fn for the loop; logs implicit rewards, their margin and preference accuracy.

    sft_weight > 0 adds the chosen replies' per-token negative log-likelihood (RPO, Pang et al.,
    2024; chosen_nll, TRL's token average): plain DPO only needs the margin to grow and often
    gets there by lowering the chosen reply's probability too, which costs answer quality.
    """

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        logps = pair_logps(model, batch["input_ids"], batch["labels"])
        ref, lengths = batch["ref_logps"], reply_lengths(batch["labels"])
        loss, chosen_r, rejected_r = dpo_loss(
            logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta, kind, lengths, label_smoothing
        )
        if sft_weight > 0:
            loss = loss + sft_weight * chosen_nll(logps, lengths)
        return loss, {
            "reward_margin": (chosen_r - rejected_r).mean(),
            "pref_acc": (chosen_r > rejected_r).float().mean(),
            "chosen_reward": chosen_r.mean(),
            "rejected_reward": rejected_r.mean(),
        }

    return loss_fn


@torch.no_grad()
def evaluate_dpo(
    model: nn.Module,
    rows: dict[str, np.ndarray],
    batch_size: int,
    beta: float,
    kind: Kind,
    limit: int | None = None,
    label_smoothing: float = 0.0,
) -> dict[str, float]:
    """Held-out DPO loss, implicit-reward accuracy and margin, and the chosen-over-rejected
    log-prob margin of the policy (val_logp_margin) beside the reference's (ref_logp_margin)."""
    logp, lengths = score_pairs(model, rows, batch_size, limit)
    ref = torch.from_numpy(rows["ref_logps"][: len(logp)]).to(logp.device).float()
    loss, chosen_r, rejected_r = dpo_loss(
        logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1], beta, kind, lengths, label_smoothing
    )
    return {
        "val_loss": float(loss),
        "val_pref_accuracy": float((chosen_r > rejected_r).float().mean()),
        "val_reward_margin": float((chosen_r - rejected_r).mean()),
        "val_logp_margin": float((logp[:, 0] - logp[:, 1]).mean()),
        "ref_logp_margin": float((ref[:, 0] - ref[:, 1]).mean()),
        "val_chosen_logp_change": float((logp[:, 0] - ref[:, 0]).mean()),
    }
