"""Seq2SeqLM: an encoder-decoder Transformer (BART's shape), built from transformer.py's parts.

The encoder is the bidirectional stack of transformer.Block (ModelConfig.causal=False, post-norm,
embedding norm, learned positions from pos_offset); the decoder is causal Blocks' attention and
MLP plus one cross-attention per layer over the encoder's output. One token embedding is shared
by encoder, decoder and the tied lm_head, whose logits get a (non-trained) final_logits_bias, as
in BartForConditionalGeneration, so a BART checkpoint maps onto it tensor for tensor
(hf_families.bart_rules). ModelConfig.is_encoder_decoder (n_dec_layer > 0) selects this class
(convert.model_class).

Shapes: B batch, S source length, T target length, C = n_embd, V = vocab_size.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lmforge.model.config import ModelConfig
from lmforge.model.generate import KVCache
from lmforge.model.transformer import (
    MLP,
    Block,
    CausalSelfAttention,
    attention_mask,
    check_length,
    init_normal_,
    make_norm,
    next_token_loss,
)

CrossKV = list[tuple[Tensor, Tensor]]  # per decoder layer: encoder keys, values (B, h, S, hd)


class CrossAttention(nn.Module):
    """Decoder queries over the encoder's keys/values (computed once per source: cross_kv)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.hd
        width = config.n_head * config.hd
        self.q = nn.Linear(config.n_embd, width, bias=config.bias)
        self.kv = nn.Linear(config.n_embd, 2 * width, bias=config.bias)
        self.proj = nn.Linear(width, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def keys_values(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        B, S, _ = memory.shape
        k, v = self.kv(memory).view(B, S, 2, self.n_head, self.head_dim).unbind(2)
        return k.transpose(1, 2), v.transpose(1, 2)  # (B, n_head, S, hd) each

    def forward(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        y = nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, n_head, T, hd)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, -1)))


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention, MLP; each a residual branch with its norm
    (post-norm as BART: norm(x + f(x)); pre-norm otherwise: x + f(norm(x)))."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.post_norm = config.post_norm
        self.attn_norm = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.cross_norm = make_norm(config)
        self.cross = CrossAttention(config)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)

    def _residual(self, norm: nn.Module, x: Tensor, branch) -> Tensor:
        return norm(x + branch(x)) if self.post_norm else x + branch(norm(x))

    def forward(
        self,
        x: Tensor,
        self_mask: Tensor | None,
        cross: tuple[Tensor, Tensor],
        cross_mask: Tensor | None,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> Tensor:
        x = self._residual(
            self.attn_norm, x, lambda h: self.attn(h, None, self_mask, kv_cache, start_pos)
        )
        x = self._residual(self.cross_norm, x, lambda h: self.cross(h, *cross, cross_mask))
        return self._residual(self.mlp_norm, x, self.mlp)  # (B, T, C)


class Seq2SeqLM(nn.Module):
    """Source ids in, target logits out: encode(src) once, decode(tgt) against it."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        C, n_pos = config.n_embd, config.block_size + config.pos_offset
        dec_config = replace(config, causal=True, n_dec_layer=0)
        self.dec_config = dec_config
        self.tok_emb = nn.Embedding(config.vocab_size, C)
        self.enc_pos_emb = nn.Embedding(n_pos, C)
        self.enc_emb_norm = make_norm(config) if config.emb_norm else None
        self.enc_blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.enc_norm_f = nn.Identity() if config.post_norm else make_norm(config)
        self.dec_pos_emb = nn.Embedding(n_pos, C)
        self.dec_emb_norm = make_norm(config) if config.emb_norm else None
        self.dec_blocks = nn.ModuleList(
            DecoderBlock(dec_config, i) for i in range(config.n_dec_layer)
        )
        self.dec_norm_f = nn.Identity() if config.post_norm else make_norm(config)
        self.drop = nn.Dropout(config.dropout)
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        self.register_buffer("final_logits_bias", torch.zeros(1, config.vocab_size))
        self.tie_weights()
        self.gradient_checkpointing = False  # recompute each block's activations in backward
        self.init_weights()

    def tie_weights(self) -> None:
        """The output layer is the shared token embedding (BART ties all three)."""
        self.lm_head.weight = self.tok_emb.weight

    def init_weights(self) -> None:
        """transformer.init_normal_ (the Transformer's init), the residual projections of the
        encoder and of the decoder each scaled by their own depth; final_logits_bias zero."""
        init_normal_(self, self.config.init_std, self.enc_blocks, self.dec_blocks)
        nn.init.zeros_(self.final_logits_bias)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Nothing to recompute (learned positions); here so loaders treat both classes alike."""

    def _embed(self, ids: Tensor, pos_emb: nn.Embedding, norm: nn.Module | None, start: int):
        T = ids.size(1)
        check_length(self.config, start + T)
        pos = torch.arange(start, start + T, device=ids.device) + self.config.pos_offset
        x = self.tok_emb(ids) + pos_emb(pos)  # (B, T, C)
        return self.drop(x if norm is None else norm(x))

    def encode(self, src: Tensor, src_mask: Tensor | None = None) -> Tensor:
        """Encoder output (B, S, C) of right-padded source ids; src_mask (B, S): 1 = token."""
        x = self._embed(src, self.enc_pos_emb, self.enc_emb_norm, 0)
        mask = attention_mask(src.size(1), 0, None, None, src.device, src_mask, causal=False)
        for block in self.enc_blocks:
            x = self._run(block, x, None, mask)
        return self.enc_norm_f(x)

    def cross_kv(self, memory: Tensor) -> CrossKV:
        """Every decoder layer's keys/values of the encoder output: computed once per source."""
        return [block.cross.keys_values(memory) for block in self.dec_blocks]

    def decode(
        self,
        tgt: Tensor,
        cross: CrossKV,
        src_mask: Tensor | None = None,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> Tensor:
        """Decoder hidden states (B, T, C) of target ids at start_pos.. (cached before that)."""
        x = self._embed(tgt, self.dec_pos_emb, self.dec_emb_norm, start_pos)
        T = tgt.size(1)
        self_mask = attention_mask(T, start_pos, None, None, tgt.device)
        cross_mask = None
        if src_mask is not None and not bool(src_mask.all()):
            cross_mask = src_mask.bool()[:, None, None, :]  # (B, 1, 1, S): padding keys hidden
        for block, kv in zip(self.dec_blocks, cross, strict=True):
            if kv_cache is None:
                x = self._run(block, x, self_mask, kv, cross_mask)
            else:
                x = block(x, self_mask, kv, cross_mask, kv_cache, start_pos)
        return self.dec_norm_f(x)

    def _run(self, block: nn.Module, *args: object) -> Tensor:
        """block(*args), recomputed in backward when gradient_checkpointing is on (training)."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def logits(self, h: Tensor) -> Tensor:
        return self.lm_head(h) + self.final_logits_bias.to(h.dtype)

    def forward(
        self,
        input_ids: Tensor,
        decoder_input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, T, V) of the decoder inputs (BART's shift-right of the targets), or with
        labels (B, T), aligned to them, -100 = no loss, the mean fp32 cross-entropy."""
        memory = self.encode(input_ids, attention_mask)
        h = self.decode(decoder_input_ids, self.cross_kv(memory), attention_mask)
        logits = self.logits(h)
        return logits if labels is None else next_token_loss(logits, labels)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty self-attention cache for the decoder, on the model's device and dtype."""
        cfg, p = self.dec_config, self.tok_emb.weight
        return KVCache(
            self.config.n_dec_layer, batch_size, cfg.n_kv_head, max_len, cfg.hd,
            device=p.device, dtype=p.dtype,
        )  # fmt: skip

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (the tied lm_head once); exclude_embeddings drops position tables."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.enc_pos_emb.weight.numel() + self.dec_pos_emb.weight.numel()
        return n
