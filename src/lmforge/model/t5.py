"""T5 checkpoints through one thin adapter around transformers' T5ForConditionalGeneration.

T5 differs from our blocks in three places at once (relative position buckets shared from the
first layer, unscaled attention, RMSNorm without mean/bias, gated activations in v1.1), so instead
of a second native encoder-decoder the adapter exposes transformers' own module behind
Seq2SeqLM's interface: forward(labels=) for the training loop's loss_fn, and encode / cross_kv /
decode / logits / new_cache for seq2seq_generate. Logits are transformers' by construction; the
decoder's cache is transformers' EncoderDecoderCache, whose cross-attention keys/values are
computed at the first step and reused after. Export is transformers' own save_pretrained.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lmforge.model.transformer import next_token_loss


@dataclass(frozen=True)
class T5Shape:
    """The ModelConfig fields the rest of lmforge reads from a model (sizes, not behaviour)."""

    vocab_size: int
    n_layer: int
    n_dec_layer: int
    n_embd: int
    block_size: int  # T5 has no position table; this is the length it was trained to (n_positions)
    causal: bool = False
    tie_embeddings: bool = True

    @property
    def is_encoder_decoder(self) -> bool:
        """As ModelConfig.is_encoder_decoder: T5 always is one."""
        return self.n_dec_layer > 0


def wraps_transformers(model: nn.Module) -> bool:
    """A T5Adapter: parameter names are transformers' own (under "hf.") and transformers'
    save_pretrained writes it."""
    return isinstance(model, T5Adapter)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("T5 checkpoints need transformers: pip install 'lmforge[hf]'") from None
    return transformers


class T5Adapter(nn.Module):
    """transformers' T5 with Seq2SeqLM's methods; .hf is the wrapped module."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf = hf_model
        c = hf_model.config
        self.config = T5Shape(
            vocab_size=c.vocab_size, n_layer=c.num_layers, n_dec_layer=c.num_decoder_layers,
            n_embd=c.d_model, block_size=int(getattr(c, "n_positions", None) or 512),
            tie_embeddings=bool(c.tie_word_embeddings),
        )  # fmt: skip

    def encode(self, src: Tensor, src_mask: Tensor | None = None) -> Tensor:
        return self.hf.encoder(input_ids=src, attention_mask=src_mask).last_hidden_state

    def cross_kv(self, memory: Tensor) -> Tensor:
        """The encoder output itself: T5's cache projects it to keys/values once, at step 0."""
        return memory

    def decode(
        self,
        tgt: Tensor,
        cross: Tensor,
        src_mask: Tensor | None = None,
        kv_cache: object | None = None,
        start_pos: int = 0,
    ) -> Tensor:
        out = self.hf.decoder(
            input_ids=tgt, encoder_hidden_states=cross, encoder_attention_mask=src_mask,
            cache=kv_cache, use_cache=kv_cache is not None,
        )  # fmt: skip
        return out.last_hidden_state

    def logits(self, h: Tensor) -> Tensor:
        if self.hf.config.scale_decoder_outputs:  # tied T5 rescales before the shared matrix
            h = h * self.hf.config.d_model**-0.5
        return self.hf.lm_head(h)

    def new_cache(self, batch_size: int, max_len: int) -> object:
        cache_utils = _transformers().cache_utils
        cfg = self.hf.config
        return cache_utils.EncoderDecoderCache(
            cache_utils.DynamicCache(config=cfg), cache_utils.DynamicCache(config=cfg)
        )

    def forward(
        self,
        input_ids: Tensor,
        decoder_input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        h = self.decode(decoder_input_ids, self.encode(input_ids, attention_mask), attention_mask)
        logits = self.logits(h)
        return logits if labels is None else next_token_loss(logits, labels)

    def save_hf(self, out_dir: Path, extra_config: dict | None = None) -> None:
        """transformers' save_pretrained (config.json + model.safetensors), ids merged in."""
        for key, value in (extra_config or {}).items():
            setattr(self.hf.config, key, value)
        self.hf.save_pretrained(str(out_dir))


def load_t5(model_dir: Path, device: torch.device | str, dtype: torch.dtype) -> T5Adapter:
    """A local T5 checkpoint (config.json model_type t5) as a T5Adapter in eval mode."""
    transformers = _transformers()
    hf = transformers.T5ForConditionalGeneration.from_pretrained(str(model_dir), dtype=dtype)
    return T5Adapter(hf.to(device)).eval()
