"""Self-attention: rotary position embeddings and multi-head attention with grouped k/v heads.

Attention goes through F.scaled_dot_product_attention: the is_causal fast path when nothing else
restricts attention, else the boolean mask model.masks builds. The Transformer's blocks
(model.blocks) and the encoder-decoder's (model.seq2seq) use it alike.

With model.qk_norm, each head's queries and keys go through an RMSNorm over hd (one gain vector
shared by all heads, as Qwen3 trains with; OLMo-2's norm instead spans all heads' n_head * hd at
once) before rotary embeddings; every path that computes q/k (training, prefill, cached and
compiled decoding, serving) runs this forward.

Shapes: B batch, T sequence length, C = n_embd, hd = head_dim.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.model.config import ModelConfig
from lmforge.model.norms import RMSNorm

if TYPE_CHECKING:
    from lmforge.model.generate import KVCache

Rope = tuple[Tensor, Tensor]  # (cos, sin), each broadcastable to (B, n_head, T, hd)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[i], x[i + hd/2]) by position-dependent angles (the HF/Llama layout)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, h, T, hd/2) each
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head attention with grouped key/value heads and one fused q/k/v projection."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.causal = config.causal
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.hd
        self.dropout = config.dropout
        qkv_out = (config.n_head + 2 * config.n_kv_head) * config.hd
        self.qkv = nn.Linear(config.n_embd, qkv_out, bias=config.bias or config.attn_bias)
        self.proj = nn.Linear(config.n_head * config.hd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.q_norm = RMSNorm(config.hd, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.hd, config.norm_eps) if config.qk_norm else None

    def forward(
        self,
        x: Tensor,
        rope: Rope | None,
        mask: Tensor | None,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> Tensor:
        B, T, _ = x.shape
        nh, nkv, hd = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = q.view(B, T, nh, hd).transpose(1, 2)  # (B, n_head, T, hd)
        k = k.view(B, T, nkv, hd).transpose(1, 2)  # (B, n_kv_head, T, hd)
        v = v.view(B, T, nkv, hd).transpose(1, 2)  # (B, n_kv_head, T, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # per head, over hd
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, start_pos, k, v)  # (B, n_kv_head, T_k, hd)
        gqa = nkv != nh
        # CUDA's masked SDPA kernels lack GQA (it would fall back to the slow math path), so
        # expand k/v heads there; on CPU enable_gqa with a mask is exact and about 2x faster.
        expand = gqa and mask is not None and q.device.type == "cuda"
        if expand:
            k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal and mask is None and T > 1,
            enable_gqa=gqa and not expand,
        )  # (B, n_head, T, hd)
        y = y.transpose(1, 2).reshape(B, T, nh * hd)  # (B, T, n_head * hd)
        return self.resid_dropout(self.proj(y))
