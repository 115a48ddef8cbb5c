"""Sparse mixture of experts: the MLP of a block replaced by num_experts SwiGLU experts, each token
sent to its top-k (Mixtral, OLMoE, Qwen-MoE).

The router is a bias-free Linear(C, E); its softmax is taken in float32, the top-k weights are
renormalised when config.norm_topk_prob (Mixtral) and used raw otherwise (Qwen-MoE), as in
transformers' MixtralSparseMoeBlock. Experts are plain modules of nn.Linear (blocks.MLP), so LoRA,
int8/int4 quantization and magnitude pruning find them by their usual walks.

Dispatch gathers tokens: the (token, slot) pairs are sorted by expert, each expert runs once on
its contiguous rows, and the weighted outputs are index_add'ed back, so the work is k tokens'
worth rather than every token through every expert.

Every training-mode forward keeps its routing statistics (RouterStats) over the tokens it is told
are real (an eval-mode forward, which nothing reads them after, keeps none):
padding (a packed row's doc_ids < 0, a padded batch's pad_mask 0) is routed like any token but
left out of the statistics, as transformers' load_balancing_loss_func does given an
attention_mask, so a fine-tuning batch's pads do not pull the balance.
Transformer.forward(labels=) adds router_loss() over its layers while training: the
Switch/Mixtral load-balancing loss (equal to transformers' load_balancing_loss_func over all
layers' router logits) and the ST-MoE z-loss;
routing_metrics() gives the training loop the same numbers and each expert's share of tokens.

Shapes: B batch, T sequence length, C = n_embd, N = B * T tokens, E experts, k = top-k.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmforge.model.config import ModelConfig


@dataclass
class RouterStats:
    """One MoE forward's routing, summed over its N tokens (what the losses average)."""

    assigned: Tensor  # (E,) float: top-k slots routed to each expert (no gradient)
    prob_sum: Tensor  # (E,) float32: router softmax probabilities summed over tokens
    z_sum: Tensor  # () float32: sum over tokens of logsumexp(router logits) ** 2
    n_tokens: int


class MoE(nn.Module):
    """Top-k routed SwiGLU experts in place of one MLP: (B, T, C) -> (B, T, C)."""

    def __init__(self, config: ModelConfig, make_expert: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.router = nn.Linear(config.n_embd, config.num_experts, bias=False)
        self.experts = nn.ModuleList(make_expert() for _ in range(config.num_experts))
        # the last forward's in training mode, for router_loss and routing_metrics; None after
        # an eval-mode forward, which computes none
        self.stats: RouterStats | None = None

    # Eager inside a compiled model (train.compile, the compiled decoding step): the per-expert
    # row counts are data, so dynamo broke the graph there anyway and then recompiled for each
    # new spread of tokens over experts until its recompile limit (8), decoding included.
    @torch.compiler.disable
    def forward(self, x: Tensor, real: Tensor | None = None) -> Tensor:
        """real: (B, T) bool, False on padding (left out of the routing statistics); None means
        every token is real."""
        B, T, C = x.shape
        flat = x.reshape(-1, C)  # (N, C)
        logits = self.router(flat).float()  # (N, E)
        probs = logits.softmax(dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k) each
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        slots = chosen.flatten()  # (N * k,) expert of each (token, slot)
        counts = torch.bincount(slots, minlength=self.num_experts)  # (E,)
        self.stats = _stats(logits, probs, chosen, counts, real) if self.training else None
        order = slots.argsort(stable=True)  # slots grouped by expert
        token_of = order // self.top_k  # (N * k,) the token each sorted slot belongs to
        rows = flat[token_of]  # (N * k, C)
        # with gradients on, an expert no token chose still runs (on 0 rows): its gradient is
        # zeros rather than None, so every rank's DDP buckets and FSDP reductions match
        keep_all = torch.is_grad_enabled()
        outs = [
            self.experts[e](part)
            for e, part in enumerate(rows.split(counts.tolist()))
            if part.size(0) or keep_all
        ]
        slot_weights = weights.flatten()[order].unsqueeze(-1)  # (N * k, 1) float32
        y = (torch.cat(outs) * slot_weights).to(x.dtype)  # (N * k, C)
        return torch.zeros_like(flat).index_add_(0, token_of, y).view(B, T, C)


def _stats(
    logits: Tensor, probs: Tensor, chosen: Tensor, counts: Tensor, real: Tensor | None
) -> RouterStats:
    """RouterStats of one forward over its real tokens (all N when real is None)."""
    lse_sq = torch.logsumexp(logits, dim=-1).square()  # (N,)
    if real is None:
        return RouterStats(counts.detach().float(), probs.sum(0), lse_sq.sum(), probs.size(0))
    keep = real.reshape(-1, 1).to(probs.dtype)  # (N, 1)
    E = probs.size(-1)
    assigned = torch.bincount(chosen[real.reshape(-1)].flatten(), minlength=E).float()
    n_real = int(real.sum())  # a count the losses divide by: read once per layer
    return RouterStats(assigned, (probs * keep).sum(0), (lse_sq * keep[:, 0]).sum(), n_real)


def moe_layers(model: nn.Module) -> list[MoE]:
    """Every MoE in model (a compiled or DDP-wrapped model is searched through its wrapper)."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def _losses(layers: list[MoE]) -> tuple[Tensor, Tensor, Tensor]:
    """(assigned, load-balancing loss, z-loss) of the layers' last forwards, their statistics
    summed once: assigned (E,) is every layer's top-k slots per expert; the losses are
    load_balancing_loss's and z_loss's."""
    stats = [m.stats for m in layers if m.stats is not None]
    if not stats:
        raise RuntimeError("router statistics are read after a forward pass of the MoE model")
    assigned = torch.stack([s.assigned for s in stats]).sum(0)
    prob_sum = torch.stack([s.prob_sum for s in stats]).sum(0)
    z_sum = torch.stack([s.z_sum for s in stats]).sum()
    rows = max(sum(s.n_tokens for s in stats), 1)  # a batch of padding only: no real token, no loss
    balance = len(prob_sum) * torch.sum(assigned / rows * (prob_sum / rows))
    return assigned, balance, z_sum / rows


def load_balancing_loss(layers: list[MoE]) -> Tensor:
    """Switch/Mixtral auxiliary loss E * sum_e f_e * P_e over every layer's tokens together:
    f_e the share of top-k slots on expert e, P_e its mean router probability. k when perfectly
    balanced, up to k * E when every token picks the same experts."""
    return _losses(layers)[1]


def z_loss(layers: list[MoE]) -> Tensor:
    """ST-MoE router z-loss: the mean over tokens (all layers) of logsumexp(router logits)^2."""
    return _losses(layers)[2]


def router_loss(layers: list[MoE], config: ModelConfig) -> Tensor:
    """What training adds to the LM loss: aux coef * load balancing + z coef * z-loss."""
    _, balance, z = _losses(layers)
    loss = config.router_aux_loss_coef * balance
    if config.router_z_loss_coef:
        loss = loss + config.router_z_loss_coef * z
    return loss


def routing_metrics(layers: list[MoE]) -> dict[str, Tensor]:
    """Training metrics of the layers' last forward: moe_aux_loss, moe_z_loss,
    moe_expert_frac_<e> (share of all layers' top-k slots on expert e; 1/E each when balanced)
    and moe_max_load (the busiest expert of any layer over its fair share; 1.0 when balanced).
    Empty for dense models (no layers)."""
    if not layers or layers[0].stats is None:
        return {}
    with torch.no_grad():
        assigned, balance, z = _losses(layers)
        frac = assigned / assigned.sum().clamp_min(1)
        per_layer = torch.stack(
            [m.stats.assigned / m.stats.assigned.sum().clamp_min(1) for m in layers]
        )
        metrics = {
            "moe_aux_loss": balance,
            "moe_z_loss": z,
            "moe_max_load": per_layer.max() * len(frac),
        }
        metrics.update({f"moe_expert_frac_{e}": f for e, f in enumerate(frac)})
    return metrics
