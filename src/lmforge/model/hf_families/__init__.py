"""Hugging Face model families: config.json <-> ModelConfig, and parameter-name tables.

Each family is a small set of functions in FAMILIES (keyed by config.json's model_type). Weight
names map through a table of Rules built from the config: one of our tensors is the concatenation
(dim 0) of one or more HF tensors, optionally transposed (GPT-2's Conv1D stores weights as
(in, out)). The same table drives import and export, so the two directions cannot drift apart.

A sequence classifier is the same body without lm_head plus SCORE, a bias-free
Linear(n_embd, num_labels) that every family here names alike; its class is the family's
`classifier` architecture (e.g. LlamaForSequenceClassification).

One module per family group (llama: llama/mistral/qwen2/qwen3, mixtral, qwen3_moe, gpt2, bert:
bert/roberta, bart) holds its config translation and name table; rules holds the table
machinery. This module is the registry (FAMILIES) and family_for, which recognizes the family
that represents a ModelConfig.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmforge.model.config import BART_SHAPE, BERT_SHAPE, ModelConfig
from lmforge.model.hf_families.bart import bart_config, bart_hf, bart_rules
from lmforge.model.hf_families.bert import (
    bert_config,
    bert_rules,
    encoder_hf,
    roberta_config,
    roberta_rules,
)
from lmforge.model.hf_families.gpt2 import gpt2_config, gpt2_hf, gpt2_rules
from lmforge.model.hf_families.llama import (
    llama_config,
    llama_like_hf,
    llama_rules,
    mistral_config,
    qwen2_config,
    qwen3_config,
)
from lmforge.model.hf_families.mixtral import hub_layout, mixtral_config, mixtral_hf, mixtral_rules
from lmforge.model.hf_families.qwen3_moe import (
    qwen3_moe_config,
    qwen3_moe_hf,
    qwen3_moe_layout,
    qwen3_moe_rules,
)
from lmforge.model.hf_families.rules import Rule


@dataclass(frozen=True)
class Family:
    """How one HF model_type maps onto ModelConfig and our parameter names."""

    architecture: str  # the HF causal-LM class, written to config.json "architectures"
    classifier: str  # the HF sequence-classification class (body + SCORE, no lm_head)
    to_config: Callable[[dict[str, Any]], ModelConfig]
    hf_config: Callable[[ModelConfig, str, str], dict[str, Any]]
    rules: Callable[[ModelConfig], list[Rule]]
    prefix: str = ""  # some checkpoints (the original gpt2) omit this prefix on body tensors
    # rewrites a checkpoint's tensors to the names rules() uses (Mixtral's fused experts)
    renames: Callable[[dict[str, Any]], dict[str, Any]] | None = None


FAMILIES: dict[str, Family] = {
    "llama": Family(
        "LlamaForCausalLM",
        "LlamaForSequenceClassification",
        llama_config,
        llama_like_hf,
        llama_rules,
    ),
    "mistral": Family(
        "MistralForCausalLM",
        "MistralForSequenceClassification",
        mistral_config,
        llama_like_hf,
        llama_rules,
    ),
    "qwen2": Family(
        "Qwen2ForCausalLM",
        "Qwen2ForSequenceClassification",
        qwen2_config,
        llama_like_hf,
        llama_rules,
    ),
    "gpt2": Family(
        "GPT2LMHeadModel",
        "GPT2ForSequenceClassification",
        gpt2_config,
        gpt2_hf,
        gpt2_rules,
        "transformer.",
    ),
    "bert": Family(
        "BertForMaskedLM", "BertForSequenceClassification", bert_config, encoder_hf, bert_rules
    ),
    "roberta": Family(
        "RobertaForMaskedLM",
        "RobertaForSequenceClassification",
        roberta_config,
        encoder_hf,
        roberta_rules,
    ),
    "bart": Family(
        "BartForConditionalGeneration",
        "BartForSequenceClassification",
        bart_config,
        bart_hf,
        bart_rules,
    ),
    "qwen3": Family(
        "Qwen3ForCausalLM",
        "Qwen3ForSequenceClassification",
        qwen3_config,
        llama_like_hf,
        llama_rules,
    ),
    "mixtral": Family(
        "MixtralForCausalLM",
        "MixtralForSequenceClassification",
        mixtral_config,
        mixtral_hf,
        mixtral_rules,
        renames=hub_layout,
    ),
    "qwen3_moe": Family(
        "Qwen3MoeForCausalLM",
        "Qwen3MoeForSequenceClassification",
        qwen3_moe_config,
        qwen3_moe_hf,
        qwen3_moe_rules,
        renames=qwen3_moe_layout,
    ),
}
ENCODER_FAMILIES = ("bert", "roberta")
SEQ2SEQ_FAMILIES = ("bart",)


def family_for(cfg: ModelConfig) -> str | None:
    """The HF model_type that represents cfg exactly, or None (export in lmforge's own layout)."""
    standard_heads = cfg.hd * cfg.n_head == cfg.n_embd
    if cfg.qk_norm:  # of the families here only Qwen3 and Qwen3-MoE have q_norm/k_norm
        if not _qwen3_shape(cfg):
            return None
        return "qwen3_moe" if cfg.num_experts else "qwen3"
    if cfg.is_encoder_decoder:
        return "bart" if _bart_shape(cfg, standard_heads) else None
    if not cfg.causal:
        return _encoder_family(cfg, standard_heads)
    if cfg.post_norm or cfg.emb_norm or cfg.type_vocab_size or cfg.pos_offset or cfg.mlm_head:
        return None  # decoders with encoder parts: no HF family has them
    if cfg.num_experts:
        return "mixtral" if _mixtral_shape(cfg) else None
    if (cfg.norm, cfg.pos) == ("layernorm", "learned") and cfg.mlp in ("gelu", "gelu_exact"):
        gpt2_ok = cfg.bias and cfg.n_kv_head == cfg.n_head and standard_heads
        return "gpt2" if gpt2_ok and cfg.sliding_window is None else None
    if (cfg.norm, cfg.pos, cfg.mlp) != ("rmsnorm", "rope", "swiglu"):
        return None
    if cfg.sliding_window is not None:  # Mistral's rotary is Llama's, rope_scaling included
        return "mistral" if not (cfg.bias or cfg.attn_bias) else None
    if cfg.attn_bias and not cfg.bias:
        return "qwen2" if standard_heads else None
    return "llama"


def _qwen3_shape(cfg: ModelConfig) -> bool:
    """A bias-free Llama-style decoder (what Qwen3ForCausalLM and Qwen3MoeForCausalLM compute,
    given q_norm/k_norm)."""
    encoder_parts = cfg.post_norm or cfg.emb_norm or cfg.type_vocab_size or cfg.pos_offset
    return (
        cfg.causal  # not an encoder, nor an encoder-decoder
        and not (encoder_parts or cfg.mlm_head)
        and (cfg.norm, cfg.pos, cfg.mlp) == ("rmsnorm", "rope", "swiglu")
        and not (cfg.bias or cfg.attn_bias)
    )


def _mixtral_shape(cfg: ModelConfig) -> bool:
    """Whether a mixture-of-experts decoder is exactly Mixtral (renormalised top-k, bias-free;
    its rotary, rope_scaling included, is Llama's)."""
    llama_like = (cfg.norm, cfg.pos, cfg.mlp) == ("rmsnorm", "rope", "swiglu")
    return llama_like and not (cfg.bias or cfg.attn_bias) and cfg.norm_topk_prob


def _has_shape(cfg: ModelConfig, shape: dict[str, Any], standard_heads: bool) -> bool:
    """cfg has every field of shape (config.BERT_SHAPE / BART_SHAPE), a GELU and plain heads."""
    return (
        all(getattr(cfg, k) == v for k, v in shape.items())
        and cfg.mlp in ("gelu", "gelu_exact")
        and cfg.n_kv_head == cfg.n_head
        and standard_heads
    )


def _encoder_family(cfg: ModelConfig, standard_heads: bool) -> str | None:
    """bert (positions from 0) or roberta (from pos_offset), if cfg is exactly that shape."""
    if not _has_shape(cfg, BERT_SHAPE, standard_heads) or cfg.type_vocab_size < 1:
        return None
    return "roberta" if cfg.pos_offset else "bert"


def _bart_shape(cfg: ModelConfig, standard_heads: bool) -> bool:
    """Whether an encoder-decoder config is exactly BART (bart_config's fixed fields)."""
    return _has_shape(cfg, BART_SHAPE, standard_heads)
