"""A Transformer block and its parts: norms, the feed-forward MLP (or model.moe's mixture of
experts), the residual Block around attention (model.attention), BERT's MLM transform, and the
GPT-2 init every stack of blocks gets.

Shapes: B batch, T sequence length, C = n_embd.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.model.attention import CausalSelfAttention, Rope
from lmforge.model.config import ModelConfig
from lmforge.model.moe import MoE
from lmforge.model.norms import RMSNorm, make_norm

if TYPE_CHECKING:
    from lmforge.model.generate import KVCache


class MLP(nn.Module):
    """SwiGLU (fc holds [gate; up]) or GELU feed-forward."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        self.gelu_approximate = "none" if config.mlp == "gelu_exact" else "tanh"
        hidden = config.intermediate_size
        self.fc = nn.Linear(config.n_embd, 2 * hidden if self.swiglu else hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)  # (B, T, 2 * hidden) for swiglu, (B, T, hidden) for gelu
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up  # (B, T, hidden)
        else:
            h = F.gelu(h, approximate=self.gelu_approximate)
        return self.dropout(self.proj(h))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

    post_norm (BERT): norm(x + attn(x)), then norm(x + mlp(x)).
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.post_norm = config.post_norm
        self.attn_norm = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp_norm = make_norm(config)
        self.mlp = MoE(config, lambda: MLP(config)) if config.num_experts else MLP(config)

    def forward(
        self,
        x: Tensor,
        rope: Rope | None,
        mask: Tensor | None,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        real: Tensor | None = None,
    ) -> Tensor:
        """real: (B, T) bool, False on padding; a mixture of experts leaves those tokens out of
        its routing statistics (model.moe), a dense MLP ignores it."""
        if self.post_norm:
            x = self.attn_norm(x + self.attn(x, rope, mask, kv_cache, start_pos))
            return self.mlp_norm(x + self._mlp(x, real))  # (B, T, C)
        x = x + self.attn(self.attn_norm(x), rope, mask, kv_cache, start_pos)
        return x + self._mlp(self.mlp_norm(x), real)  # (B, T, C)

    def _mlp(self, x: Tensor, real: Tensor | None) -> Tensor:
        return self.mlp(x, real) if isinstance(self.mlp, MoE) else self.mlp(x)


class MLMTransform(nn.Module):
    """BERT's MLM head before its output layer: norm(gelu(dense(h))), per token."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.n_embd, config.n_embd)
        self.approximate = "none" if config.mlp == "gelu_exact" else "tanh"
        self.norm = make_norm(config)

    def forward(self, h: Tensor) -> Tensor:
        return self.norm(F.gelu(self.dense(h), approximate=self.approximate))


def init_normal_(model: nn.Module, std: float, *stacks: nn.ModuleList) -> None:
    """Normal(0, std) linears and embeddings, zero biases, reset norms; in each stack of blocks
    the residual projections get std / sqrt(2 * its depth), which keeps the residual stream's
    variance flat with depth (GPT-2 paper)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            module.reset_parameters()
    for blocks in stacks:
        resid_std = std / math.sqrt(2 * len(blocks))
        for block in blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=resid_std)
            experts = getattr(block.mlp, "experts", [block.mlp])
            for mlp in experts:
                nn.init.normal_(mlp.proj.weight, mean=0.0, std=resid_std)
