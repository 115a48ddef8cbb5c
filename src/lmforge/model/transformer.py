"""The Transformer: one readable file, top to bottom.

Llama style (RMSNorm, RoPE, SwiGLU, GQA) and GPT-2 style (LayerNorm, learned positions, GELU,
biases) are settings of ModelConfig, not subclasses; so is a BERT/RoBERTa encoder (causal=False,
post-norm blocks, embedding norm, token types, position offset, the MLM head's transform). Attention goes through
F.scaled_dot_product_attention: the is_causal fast path when nothing else restricts attention, an
explicit boolean mask for packed documents (doc_ids), left-padded batches (pad_mask), sliding
windows and chunked prefill.

Shapes: B batch, T sequence length, C = n_embd, hd = head_dim, V = vocab_size.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lmforge.errors import InputError
from lmforge.model.chunked_loss import IGNORE_INDEX, linear_cross_entropy
from lmforge.model.config import ModelConfig

if TYPE_CHECKING:
    from lmforge.model.generate import KVCache

Rope = tuple[Tensor, Tensor]  # (cos, sin), each broadcastable to (B, n_head, T, hd)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 like Llama's reference."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).type_as(x)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def check_length(config: ModelConfig, n_tokens: int) -> None:
    """InputError when a sequence of n_tokens (cached ones included) exceeds model.block_size."""
    if n_tokens > config.block_size:
        raise InputError(
            f"sequence of {n_tokens} tokens exceeds model.block_size="
            f"{config.block_size}; shorten the input or raise model.block_size"
        )


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
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=resid_std)


def rope_inv_freq(config: ModelConfig) -> Tensor:
    """Rotary frequencies theta^(-2i/hd), with Llama 3's long-context rescaling if configured."""
    hd = config.hd
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", "default") != "llama3":
        return inv_freq
    factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(
        wavelen > old_len / low, inv_freq / factor, inv_freq
    )  # low freqs slow down
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[i], x[i + hd/2]) by position-dependent angles (the HF/Llama layout)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, h, T, hd/2) each
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def doc_positions(doc_ids: Tensor) -> Tensor:
    """Position of each token inside its document: restarts at 0 where doc_ids changes. (B, T)"""
    T = doc_ids.size(1)
    t = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)  # (B, T)
    new_doc = torch.ones_like(doc_ids, dtype=torch.bool)
    new_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    doc_start = torch.where(new_doc, t, 0).cummax(dim=1).values  # (B, T)
    return t - doc_start


def next_token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy in fp32 of logits (B, T, V) against labels (B, T), IGNORE_INDEX skipped."""
    return F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX
    )


def pad_positions(pad_mask: Tensor, start_pos: int) -> Tensor:
    """Positions of the tokens from start_pos on, counted from each row's first token. (B, T)

    pad_mask (B, start_pos + T) is 1 at tokens and 0 at padding; padding gets position 0.
    """
    pos = pad_mask.long().cumsum(dim=1) - 1  # (B, T_k) real tokens before each, minus one
    return pos[:, start_pos:].clamp(min=0)


def attention_mask(
    T: int,
    start_pos: int,
    doc_ids: Tensor | None,
    sliding_window: int | None,
    device: torch.device,
    pad_mask: Tensor | None = None,
    causal: bool = True,
) -> Tensor | None:
    """Boolean mask (B|1, 1, T, start_pos + T), True = may attend; None = plain causal (or, for
    an encoder, everything).

    None lets SDPA use is_causal=True (or no mask at all for a single decoded token), which is the
    fast path. A mask is built only for packed documents, padding (pad_mask (B, start_pos + T),
    0 = pad), sliding windows longer than the window, and multi-token steps after a cached prefix.
    An encoder's (causal=False) pad mask only hides padding keys, as BERT's attention_mask does.
    """
    if not causal:
        return _encoder_mask(T, doc_ids, device, pad_mask)
    T_k = start_pos + T
    windowed = sliding_window is not None and T_k > sliding_window
    if doc_ids is None and pad_mask is None and not windowed and (start_pos == 0 or T == 1):
        return None
    q_pos = torch.arange(start_pos, T_k, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(T_k, device=device)[None, :]  # (1, T_k)
    mask = k_pos <= q_pos  # (T, T_k) causal
    if windowed:
        mask = mask & (q_pos - k_pos < sliding_window)
    if doc_ids is not None:
        mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])  # (B, T, T) same document
    if pad_mask is not None:  # nobody attends to padding; a pad query sees itself, so that no
        # row is all-masked (SDPA would give NaN there, and 0 * NaN reaches the real tokens)
        mask = (mask & pad_mask.bool()[:, None, :]) | (k_pos == q_pos)  # (B, T, T_k)
    return mask.unsqueeze(-3)


def _encoder_mask(
    T: int, doc_ids: Tensor | None, device: torch.device, pad_mask: Tensor | None
) -> Tensor | None:
    """Bidirectional mask: same document (packed rows) and not a padding key; None = all."""
    if doc_ids is None and pad_mask is None:
        return None
    mask = torch.ones(1, T, T, dtype=torch.bool, device=device)
    if doc_ids is not None:
        mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])  # (B, T, T)
    if pad_mask is not None:
        mask = mask & pad_mask.bool()[:, None, :]  # (B, T, T)
    return mask.unsqueeze(-3)


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
        self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,
        rope: Rope | None,
        mask: Tensor | None,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> Tensor:
        if self.post_norm:
            x = self.attn_norm(x + self.attn(x, rope, mask, kv_cache, start_pos))
            return self.mlp_norm(x + self.mlp(x))  # (B, T, C)
        x = x + self.attn(self.attn_norm(x), rope, mask, kv_cache, start_pos)
        return x + self.mlp(self.mlp_norm(x))  # (B, T, C)


class MLMTransform(nn.Module):
    """BERT's MLM head before its output layer: norm(gelu(dense(h))), per token."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.n_embd, config.n_embd)
        self.approximate = "none" if config.mlp == "gelu_exact" else "tanh"
        self.norm = make_norm(config)

    def forward(self, h: Tensor) -> Tensor:
        return self.norm(F.gelu(self.dense(h), approximate=self.approximate))


class Transformer(nn.Module):
    """Token ids in, logits out: next-token (decoder) or masked-token (encoder with mlm_head)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        C = config.n_embd
        self.tok_emb = nn.Embedding(config.vocab_size, C)
        n_pos = config.block_size + config.pos_offset
        self.pos_emb = nn.Embedding(n_pos, C) if config.pos == "learned" else None
        self.type_emb = nn.Embedding(config.type_vocab_size, C) if config.type_vocab_size else None
        self.emb_norm = make_norm(config) if config.emb_norm else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = nn.Identity() if config.post_norm else make_norm(config)
        self.mlm_transform = MLMTransform(config) if config.mlm_head else None
        self.lm_head = nn.Linear(C, config.vocab_size, bias=config.mlm_head)
        self.tie_weights()
        self.gradient_checkpointing = False  # recompute each block's activations in backward
        rope_shape = (config.block_size, config.hd)
        has_rope = config.pos == "rope"
        self.register_buffer("rope_cos", torch.empty(rope_shape) if has_rope else None, False)
        self.register_buffer("rope_sin", torch.empty(rope_shape) if has_rope else None, False)
        self.init_weights()

    def tie_weights(self) -> None:
        """Make lm_head share the token embedding when the config says so (call after loading)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def init_weights(self) -> None:
        """Normal(0, init_std) everywhere; residual projections scaled by 1/sqrt(2 * n_layer)
        (init_normal_). Also (re)computes the rotary tables, so a model built on the meta device
        and moved with to_empty() is complete after this call.
        """
        init_normal_(self, self.config.init_std, self.blocks)
        self.init_buffers()

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Fill the (non-persistent) rotary cos/sin tables in float32 on device (default: the
        token embedding's; a loader passes it, since a quantized table has no weight tensor)."""
        if self.rope_cos is None:
            return
        device = device or self.tok_emb.weight.device
        t = torch.arange(self.config.block_size, dtype=torch.float32, device=device)
        freqs = torch.outer(t, rope_inv_freq(self.config).to(device))  # (block_size, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (block_size, hd)
        self.rope_cos, self.rope_sin = emb.cos(), emb.sin()

    def hidden_states(
        self,
        idx: Tensor,
        doc_ids: Tensor | None = None,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        pad_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        """Final-norm hidden states (B, T, C): what lm_head, classifier and reward heads read.

        token_type_ids (B, T): an encoder's segment of each token (1 for a pair's second text);
        None means segment 0 everywhere. A model without type embeddings ignores them."""
        T = idx.size(1)
        if not self.config.causal and (kv_cache is not None or start_pos):
            raise ValueError("an encoder (causal=False) has no KV cache: pass the whole sequence")
        check_length(self.config, start_pos + T)
        if doc_ids is not None and (kv_cache is not None or start_pos > 0 or pad_mask is not None):
            raise ValueError(
                "doc_ids (packed documents) cannot be combined with a KV cache or padding"
            )
        if pad_mask is not None and pad_mask.shape != (idx.size(0), start_pos + T):
            raise ValueError(f"pad_mask must be (B, start_pos + T), got {tuple(pad_mask.shape)}")
        if doc_ids is not None:
            pos = doc_positions(doc_ids)  # (B, T)
        elif pad_mask is not None:
            pos = pad_positions(pad_mask, start_pos)  # (B, T)
        else:
            pos = torch.arange(start_pos, start_pos + T, device=idx.device)  # (T,)
        x = self.embed(idx, pos, token_type_ids)  # (B, T, C)
        # a slice is a view; per-row positions gather per token
        rope = self.rope_at(slice(start_pos, start_pos + T) if pos.dim() == 1 else pos)
        mask = attention_mask(
            T, start_pos, doc_ids, self.config.sliding_window, idx.device, pad_mask,
            causal=self.config.causal,
        )  # fmt: skip
        x = self.drop(x)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, rope, mask, use_reentrant=False)
            else:
                x = block(x, rope, mask, kv_cache, start_pos)
        return self.norm_f(x)  # (B, T, C)

    def embed(self, idx: Tensor, pos: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """The blocks' input (B, T, C): token (+ position, + type) embeddings of idx at
        positions pos ((T,) or (B, T)), normed where the model norms them. hidden_states and the
        compiled decoding step (model/compiled_decode.py) share it."""
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos + self.config.pos_offset if self.config.pos_offset else pos)
        if self.type_emb is not None and token_type_ids is not None:
            x = x + self.type_emb(token_type_ids)
        elif self.type_emb is not None:
            x = x + self.type_emb.weight[0]  # single-segment inputs: token type 0 everywhere
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        return x

    def rope_at(self, at: slice | Tensor) -> Rope | None:
        """The rotary (cos, sin) tables at positions `at` (a slice, or (B, T) per-row positions),
        each (B|1, 1, T, hd); None for a model without rotary embeddings."""
        if self.rope_cos is None:
            return None
        return self.rope_cos[at].unsqueeze(-3), self.rope_sin[at].unsqueeze(-3)

    def forward(
        self,
        idx: Tensor,
        doc_ids: Tensor | None = None,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        pad_mask: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, T, V) in the model's dtype; with labels, the mean loss against them instead
        (labels already aligned: shifted next tokens for a decoder, masked tokens for MLM).

        idx: token ids (B, T). doc_ids: (B, T) document index of each token in packed sequences;
        attention stays inside a document and positions restart at each document's first token.
        kv_cache/start_pos: incremental decoding, idx holds the tokens at start_pos..start_pos+T.
        pad_mask: (B, start_pos + T), 1 = token, 0 = padding (HF's attention_mask, cached steps
        included) for a batch of left-padded prompts: no token attends to padding and each row's
        positions start at its first token. None (no padding) keeps the unmasked fast path.
        labels: (B, T) target ids, IGNORE_INDEX (-100) where no loss is taken. The fp32
        cross-entropy then runs inside forward, so `model.compile()` fuses it with lm_head and
        the (B, T, V) fp32 logits are never kept for backward outside the compiled graph; eager
        fp32 training on CPU takes it chunk by chunk from the hidden states (chunked_loss.py).
        """
        h = self.hidden_states(idx, doc_ids, kv_cache, start_pos, pad_mask)
        if labels is not None and self.mlm_transform is not None:
            # MLM predicts ~15% of positions: the head and the V-wide logits run on those only
            picked = labels != IGNORE_INDEX  # (B, T)
            return next_token_loss(self.logits(h[picked])[None], labels[picked][None])
        if labels is not None and self._loss_from_hidden(h):
            return linear_cross_entropy(h, self.lm_head.weight, labels)
        logits = self.logits(h)
        return logits if labels is None else next_token_loss(logits, labels)

    def logits(self, h: Tensor) -> Tensor:
        """Vocabulary logits (B, T, V) of hidden states (through the MLM transform if any)."""
        if self.mlm_transform is not None:
            h = self.mlm_transform(h)
        return self.lm_head(h)

    def _loss_from_hidden(self, h: Tensor) -> bool:
        """Whether the chunked loss applies: eager fp32 training on CPU through a plain lm_head
        (a LoRA or quantized lm_head, autocast, no_grad or compile take the ordinary path)."""
        return (
            h.device.type == "cpu"
            and h.dtype == torch.float32
            and torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")
            and type(self.lm_head) is nn.Linear
            and not torch.compiler.is_compiling()
        )

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; shared (tied) tensors count once.

        exclude_embeddings drops the lookup-only tables: position embeddings, and the token
        embedding unless it is tied to lm_head (then it is also the output matmul). This is
        nanoGPT's count and the N of the 6N FLOPs rule.
        """
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
            if self.type_emb is not None:
                n -= self.type_emb.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.tok_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6N + 12 * n_layer * n_head * hd * T.

        The PaLM appendix B / nanoGPT estimate used for MFU; the second term is attention scores.
        """
        cfg = self.config
        attn = 12 * cfg.n_layer * cfg.n_head * cfg.hd * seq_len
        return float(6 * self.num_params(exclude_embeddings=True) + attn)
