"""The Transformer: token ids in, logits (or the loss) out.

Llama style (RMSNorm, RoPE, SwiGLU, GQA) and GPT-2 style (LayerNorm, learned positions, GELU,
biases) are settings of ModelConfig, not subclasses; so is a BERT/RoBERTa encoder (causal=False,
post-norm blocks, embedding norm, token types, position offset, the MLM head's transform). Its
parts each have a module: model.attention (rotary embeddings, self-attention through SDPA),
model.masks (positions and attention masks for packed documents (doc_ids), left-padded batches
(pad_mask), sliding windows and chunked prefill), model.blocks (norms, MLP, Block, init),
model.moe (mixture of experts in place of the MLP when num_experts > 0). Their names stay
importable from here.

Shapes: B batch, T sequence length, C = n_embd, hd = head_dim, V = vocab_size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lmforge.errors import InputError
from lmforge.model.attention import CausalSelfAttention, Rope, apply_rotary
from lmforge.model.blocks import MLP, Block, MLMTransform, RMSNorm, init_normal_, make_norm
from lmforge.model.chunked_loss import IGNORE_INDEX, linear_cross_entropy
from lmforge.model.config import ModelConfig
from lmforge.model.masks import attention_mask, doc_positions, pad_positions
from lmforge.model.moe import MoE, moe_layers, router_loss
from lmforge.model.rope import rope_inv_freq, rope_tables

if TYPE_CHECKING:
    from lmforge.model.generate import KVCache

__all__ = [
    "IGNORE_INDEX",
    "MLP",
    "Block",
    "CausalSelfAttention",
    "MLMTransform",
    "RMSNorm",
    "Rope",
    "Transformer",
    "apply_rotary",
    "attention_mask",
    "check_length",
    "doc_positions",
    "init_normal_",
    "make_norm",
    "next_token_loss",
    "pad_positions",
    "rope_inv_freq",
]


def check_length(config: ModelConfig, n_tokens: int) -> None:
    """InputError when a sequence of n_tokens (cached ones included) exceeds model.block_size."""
    if n_tokens > config.block_size:
        raise InputError(
            f"sequence of {n_tokens} tokens exceeds model.block_size="
            f"{config.block_size}; shorten the input or raise model.block_size"
        )


def next_token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy in fp32 of logits (B, T, V) against labels (B, T), IGNORE_INDEX skipped."""
    return F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX
    )


def _real_tokens(doc_ids: Tensor | None, pad_mask: Tensor | None, start_pos: int) -> Tensor | None:
    """(B, T) bool, False on padding (a packed row's doc_ids < 0, pad_mask 0 over the T new
    tokens), for a mixture of experts' routing statistics; None when nothing is padding."""
    if doc_ids is not None:
        return doc_ids >= 0
    if pad_mask is not None:
        return pad_mask[:, start_pos:].bool()
    return None


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
        # found once: the training loss reads them on every forward (empty for a dense model)
        self.moe_layers: list[MoE] = moe_layers(self)
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
        self.rope_cos, self.rope_sin = rope_tables(self.config, device)

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
        # which tokens count in a mixture's routing statistics, kept in training mode only
        moe_stats = self.config.num_experts and self.training
        real = _real_tokens(doc_ids, pad_mask, start_pos) if moe_stats else None
        x = self.drop(x)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, rope, mask, None, 0, real, use_reentrant=False)
            else:
                x = block(x, rope, mask, kv_cache, start_pos, real)
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
        A mixture-of-experts model in training mode adds its router losses (model.moe) to it.
        """
        h = self.hidden_states(idx, doc_ids, kv_cache, start_pos, pad_mask)
        if labels is None:
            return self.logits(h)
        loss = self._label_loss(h, labels)
        if self.config.num_experts and self.training:
            loss = loss + router_loss(self.moe_layers, self.config)
        return loss

    def _label_loss(self, h: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy of the hidden states' predictions against labels (forward's)."""
        if self.mlm_transform is not None:
            # MLM predicts ~15% of positions: the head and the V-wide logits run on those only
            picked = labels != IGNORE_INDEX  # (B, T)
            return next_token_loss(self.logits(h[picked])[None], labels[picked][None])
        if self._loss_from_hidden(h):
            return linear_cross_entropy(h, self.lm_head.weight, labels)
        return next_token_loss(self.logits(h), labels)

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
        N counts the parameters a token uses: top-k of a mixture's experts, not all of them.
        """
        cfg = self.config
        attn = 12 * cfg.n_layer * cfg.n_head * cfg.hd * seq_len
        n = self.num_params(exclude_embeddings=True)
        for moe in self.moe_layers:  # a token runs through k of the E experts only
            expert_params = sum(p.numel() for p in moe.experts.parameters())
            n -= expert_params * (moe.num_experts - moe.top_k) // moe.num_experts
        return float(6 * n + attn)
