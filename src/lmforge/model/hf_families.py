"""Hugging Face model families: config.json <-> ModelConfig, and parameter-name tables.

Each family is a small set of functions in FAMILIES (keyed by config.json's model_type). Weight
names map through a table of Rules built from the config: one of our tensors is the concatenation
(dim 0) of one or more HF tensors, optionally transposed (GPT-2's Conv1D stores weights as
(in, out)). The same table drives import and export, so the two directions cannot drift apart.

A sequence classifier is the same body without lm_head plus SCORE, a bias-free
Linear(n_embd, num_labels) that every family here names alike; its class is the family's
`classifier` architecture (e.g. LlamaForSequenceClassification).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lmforge.errors import InputError
from lmforge.model.config import BART_SHAPE, BERT_SHAPE, ModelConfig

# HF checkpoints carry these non-parameter buffers and tied copies; they are recomputed (or are
# the tied tensor), never loaded. BERT/RoBERTa's decoder weight/bias are the word embeddings and
# the MLM head's bias.
IGNORED_SUFFIXES = (
    ".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq", "embeddings.position_ids",
    "embeddings.token_type_ids", "predictions.decoder.weight", "predictions.decoder.bias",
    "lm_head.decoder.weight", "lm_head.decoder.bias",
    "encoder.embed_tokens.weight", "decoder.embed_tokens.weight",  # BART's tied copies of shared
)  # fmt: skip
SCORE = "score.weight"  # the classification head of every *ForSequenceClassification here


@dataclass(frozen=True)
class Rule:
    """ours = cat([hf[n] (transposed if transpose) for n in hf_names]); sizes split it back."""

    ours: str
    hf_names: tuple[str, ...]
    sizes: tuple[int, ...] | None = None  # row counts of each part when hf_names has several
    transpose: bool = False


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either the v4 (rope_theta/rope_scaling) or v5 layout."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return theta, {"rope_type": "llama3", **{k: params[k] for k in keys}}
    raise InputError(
        f"config.json rope type {rope_type!r} is not supported; supported: default, llama3"
    )


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    scaling = dict(cfg.rope_scaling or {"rope_type": "default"})
    return {
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {**scaling, "rope_theta": cfg.rope_theta},
    }


def _require(hf: dict[str, Any], key: str, allowed: tuple[Any, ...], default: Any) -> Any:
    """hf[key] (or default) if it is one of allowed; the value, for callers that branch on it."""
    value = hf.get(key, default)
    if value not in allowed:
        raise InputError(
            f"config.json {key}={value!r} is not supported for model_type "
            f"{hf.get('model_type')!r}; supported: {', '.join(map(repr, allowed))}"
        )
    return value


# ---- llama, mistral, qwen2: RMSNorm + RoPE + SwiGLU, differing only in biases / windows ----


def _llama_like_config(
    hf: dict[str, Any], attn_bias: bool, sliding_window: int | None
) -> ModelConfig:
    _require(hf, "hidden_act", ("silu",), "silu")
    bias = bool(hf.get("attention_bias", False))
    if bias != bool(hf.get("mlp_bias", False)):
        raise InputError("config.json attention_bias and mlp_bias differ; only equal is supported")
    n_head = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    theta, scaling = _rope_from_hf(hf)
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        n_embd=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        block_size=hf.get("max_position_embeddings", 2048),
        bias=bias,
        attn_bias=attn_bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        head_dim=None if head_dim in (None, hf["hidden_size"] // n_head) else head_dim,
        sliding_window=sliding_window,
    )


def llama_config(hf: dict[str, Any]) -> ModelConfig:
    return _llama_like_config(hf, attn_bias=False, sliding_window=None)


def mistral_config(hf: dict[str, Any]) -> ModelConfig:
    return _llama_like_config(hf, attn_bias=False, sliding_window=hf.get("sliding_window"))


def qwen2_config(hf: dict[str, Any]) -> ModelConfig:
    _require(hf, "use_sliding_window", (False,), False)
    return _llama_like_config(hf, attn_bias=True, sliding_window=None)


def _llama_like_hf(cfg: ModelConfig, model_type: str, architecture: str) -> dict[str, Any]:
    hf = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.hd,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": cfg.dropout,
        **_rope_to_hf(cfg),
    }
    if model_type == "llama":
        hf.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    elif model_type == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    else:  # qwen2
        hf.update(use_sliding_window=False, sliding_window=None)
    return hf


def llama_rules(cfg: ModelConfig) -> list[Rule]:
    qkv = (cfg.n_head * cfg.hd, cfg.n_kv_head * cfg.hd, cfg.n_kv_head * cfg.hd)
    fc = (cfg.intermediate_size, cfg.intermediate_size)
    rules = [
        Rule("tok_emb.weight", ("model.embed_tokens.weight",)),
        Rule("norm_f.weight", ("model.norm.weight",)),
    ]
    if not cfg.tie_embeddings:
        rules.append(Rule("lm_head.weight", ("lm_head.weight",)))
    params = ["weight"] + (["bias"] if cfg.bias else [])
    for i in range(cfg.n_layer):
        o, a, m = f"blocks.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        rules += [
            Rule(o + "attn_norm.weight", (f"model.layers.{i}.input_layernorm.weight",)),
            Rule(o + "mlp_norm.weight", (f"model.layers.{i}.post_attention_layernorm.weight",)),
        ]
        for p in ["weight"] + (["bias"] if cfg.bias or cfg.attn_bias else []):
            rules.append(Rule(o + f"attn.qkv.{p}", tuple(a + f"{x}_proj.{p}" for x in "qkv"), qkv))
        for p in params:
            rules += [
                Rule(o + f"attn.proj.{p}", (a + f"o_proj.{p}",)),
                Rule(o + f"mlp.fc.{p}", (m + f"gate_proj.{p}", m + f"up_proj.{p}"), fc),
                Rule(o + f"mlp.proj.{p}", (m + f"down_proj.{p}",)),
            ]
    return rules


# ---- gpt2: LayerNorm + learned positions + GELU(tanh) + biases, Conv1D (in, out) weights ----


def gpt2_config(hf: dict[str, Any]) -> ModelConfig:
    activation = _require(
        hf, "activation_function", ("gelu_new", "gelu_pytorch_tanh", "gelu"), "gelu_new"
    )
    _require(hf, "scale_attn_by_inverse_layer_idx", (False,), False)
    _require(hf, "scale_attn_weights", (True,), True)
    n_embd, n_head = hf["n_embd"], hf["n_head"]
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        n_layer=hf["n_layer"],
        n_head=n_head,
        n_kv_head=n_head,
        n_embd=n_embd,
        intermediate_size=hf.get("n_inner") or 4 * n_embd,
        block_size=hf.get("n_positions", 1024),
        norm="layernorm",
        pos="learned",
        mlp="gelu_exact" if activation == "gelu" else "gelu",
        bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )


def _gpt2_hf(cfg: ModelConfig, model_type: str, architecture: str) -> dict[str, Any]:
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.intermediate_size,
        "activation_function": "gelu" if cfg.mlp == "gelu_exact" else "gelu_new",
        "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "scale_attn_weights": True,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": None,
        "eos_token_id": None,
    }


def gpt2_rules(cfg: ModelConfig) -> list[Rule]:
    rules = [
        Rule("tok_emb.weight", ("transformer.wte.weight",)),
        Rule("pos_emb.weight", ("transformer.wpe.weight",)),
        Rule("norm_f.weight", ("transformer.ln_f.weight",)),
        Rule("norm_f.bias", ("transformer.ln_f.bias",)),
    ]
    if not cfg.tie_embeddings:
        rules.append(Rule("lm_head.weight", ("lm_head.weight",)))
    pairs = [("attn_norm", "ln_1"), ("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj")]
    pairs += [("mlp_norm", "ln_2"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")]
    for i in range(cfg.n_layer):
        for ours, theirs in pairs:
            conv1d = "norm" not in ours  # linears are Conv1D: weight stored transposed
            o, h = f"blocks.{i}.{ours}", f"transformer.h.{i}.{theirs}"
            rules.append(Rule(o + ".weight", (h + ".weight",), transpose=conv1d))
            rules.append(Rule(o + ".bias", (h + ".bias",)))
    return rules


# ---- bert, roberta: bidirectional post-norm encoders with the MLM head ----

ENCODER_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh")


def _encoder_config(hf: dict[str, Any], pos_offset: int) -> ModelConfig:
    activation = _require(hf, "hidden_act", ENCODER_ACTIVATIONS, "gelu")
    _require(hf, "position_embedding_type", ("absolute",), "absolute")
    _require(hf, "is_decoder", (False,), False)
    _require(hf, "tie_word_embeddings", (True,), True)
    n_head = hf["num_attention_heads"]
    return ModelConfig(
        **BERT_SHAPE,
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=n_head,
        n_embd=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        block_size=hf.get("max_position_embeddings", 512) - pos_offset,
        mlp="gelu_exact" if activation == "gelu" else "gelu",
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        type_vocab_size=hf.get("type_vocab_size", 2),
        pos_offset=pos_offset,
        mlm_head=True,
    )


def bert_config(hf: dict[str, Any]) -> ModelConfig:
    return _encoder_config(hf, pos_offset=0)


def roberta_config(hf: dict[str, Any]) -> ModelConfig:
    """RoBERTa counts positions from pad_token_id + 1 (its table has that many extra rows)."""
    return _encoder_config(hf, pos_offset=int(hf.get("pad_token_id", 1)) + 1)


def _encoder_hf(cfg: ModelConfig, model_type: str, architecture: str) -> dict[str, Any]:
    hf = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": "gelu" if cfg.mlp == "gelu_exact" else "gelu_pytorch_tanh",
        "max_position_embeddings": cfg.block_size + cfg.pos_offset,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.norm_eps,
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.dropout,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": True,
        "is_decoder": False,
    }
    if model_type == "roberta":  # its position ids count from this id (roberta_config)
        hf["pad_token_id"] = cfg.pos_offset - 1
    return hf


def _encoder_rules(cfg: ModelConfig, body: str, mlm: str, dense: str, mlm_norm: str) -> list[Rule]:
    """BERT's names (RoBERTa differs only in body/head prefixes and the head's norm name)."""
    e = body + "embeddings."
    pairs = [("tok_emb", "word_embeddings"), ("pos_emb", "position_embeddings"),
             ("type_emb", "token_type_embeddings")]  # fmt: skip
    rules = [Rule(f"{ours}.weight", (f"{e}{theirs}.weight",)) for ours, theirs in pairs]
    rules += [Rule(f"emb_norm.{p}", (f"{e}LayerNorm.{p}",)) for p in ("weight", "bias")]
    qkv = (cfg.n_embd, cfg.n_embd, cfg.n_embd)
    layer_pairs = [("attn.proj", "attention.output.dense"),
                   ("attn_norm", "attention.output.LayerNorm"), ("mlp.fc", "intermediate.dense"),
                   ("mlp.proj", "output.dense"), ("mlp_norm", "output.LayerNorm")]  # fmt: skip
    for i in range(cfg.n_layer):
        o, h = f"blocks.{i}.", f"{body}encoder.layer.{i}."
        for p in ("weight", "bias"):
            parts = tuple(f"{h}attention.self.{x}.{p}" for x in ("query", "key", "value"))
            rules.append(Rule(f"{o}attn.qkv.{p}", parts, qkv))
            rules += [Rule(f"{o}{ours}.{p}", (f"{h}{theirs}.{p}",)) for ours, theirs in layer_pairs]
    if cfg.mlm_head:
        for p in ("weight", "bias"):
            rules.append(Rule(f"mlm_transform.dense.{p}", (f"{mlm}{dense}.{p}",)))
            rules.append(Rule(f"mlm_transform.norm.{p}", (f"{mlm}{mlm_norm}.{p}",)))
        rules.append(Rule("lm_head.bias", (f"{mlm}bias",)))
    return rules


def bert_rules(cfg: ModelConfig) -> list[Rule]:
    return _encoder_rules(
        cfg, "bert.", "cls.predictions.", "transform.dense", "transform.LayerNorm"
    )


def roberta_rules(cfg: ModelConfig) -> list[Rule]:
    return _encoder_rules(cfg, "roberta.", "lm_head.", "dense", "layer_norm")


# ---- bart: encoder-decoder, post-norm, positions from 2, shared embeddings (model.seq2seq) ----


def bart_config(hf: dict[str, Any]) -> ModelConfig:
    """BART with equal encoder/decoder widths (the shape Seq2SeqLM has)."""
    activation = _require(hf, "activation_function", ENCODER_ACTIVATIONS, "gelu")
    _require(hf, "scale_embedding", (False,), False)
    _require(hf, "tie_word_embeddings", (True,), True)
    for enc, dec in (("encoder_attention_heads", "decoder_attention_heads"),
                     ("encoder_ffn_dim", "decoder_ffn_dim")):  # fmt: skip
        if hf[enc] != hf[dec]:
            raise InputError(
                f"config.json {enc}={hf[enc]} != {dec}={hf[dec]}; only equal is supported"
            )
    n_head = hf["encoder_attention_heads"]
    return ModelConfig(
        **BART_SHAPE,
        vocab_size=hf["vocab_size"],
        n_layer=hf["encoder_layers"],
        n_dec_layer=hf["decoder_layers"],
        n_head=n_head,
        n_kv_head=n_head,
        n_embd=hf["d_model"],
        intermediate_size=hf["encoder_ffn_dim"],
        block_size=hf.get("max_position_embeddings", 1024),
        mlp="gelu_exact" if activation == "gelu" else "gelu",
    )


def _bart_hf(cfg: ModelConfig, model_type: str, architecture: str) -> dict[str, Any]:
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.n_embd,
        "encoder_layers": cfg.n_layer,
        "decoder_layers": cfg.n_dec_layer,
        "encoder_attention_heads": cfg.n_head,
        "decoder_attention_heads": cfg.n_head,
        "encoder_ffn_dim": cfg.intermediate_size,
        "decoder_ffn_dim": cfg.intermediate_size,
        "activation_function": "gelu" if cfg.mlp == "gelu_exact" else "gelu_new",
        "max_position_embeddings": cfg.block_size,
        "scale_embedding": False,
        "dropout": cfg.dropout,
        "attention_dropout": cfg.dropout,
        "activation_dropout": 0.0,
        "init_std": cfg.init_std,
        "tie_word_embeddings": True,
        "is_encoder_decoder": True,
        "forced_bos_token_id": None,
        "forced_eos_token_id": None,
    }


def bart_rules(cfg: ModelConfig) -> list[Rule]:
    rules = [Rule("tok_emb.weight", ("model.shared.weight",)),
             Rule("final_logits_bias", ("final_logits_bias",))]  # fmt: skip
    C = cfg.n_embd
    block_pairs = [
        ("attn.proj", "self_attn.out_proj"),
        ("attn_norm", "self_attn_layer_norm"),
        ("mlp.fc", "fc1"),
        ("mlp.proj", "fc2"),
        ("mlp_norm", "final_layer_norm"),
    ]
    cross_pairs = [("cross.q", "encoder_attn.q_proj"), ("cross.proj", "encoder_attn.out_proj"),
                   ("cross_norm", "encoder_attn_layer_norm")]  # fmt: skip
    for side, n in (("enc", cfg.n_layer), ("dec", cfg.n_dec_layer)):
        body = f"model.{'encoder' if side == 'enc' else 'decoder'}."
        pairs = [("pos_emb", "embed_positions"), ("emb_norm", "layernorm_embedding")]
        for p in ("weight", "bias"):
            rules += [Rule(f"{side}_{ours}.{p}", (f"{body}{theirs}.{p}",)) for ours, theirs in pairs
                      if ours != "pos_emb" or p == "weight"]  # fmt: skip
        for i in range(n):
            o, h = f"{side}_blocks.{i}.", f"{body}layers.{i}."
            for p in ("weight", "bias"):
                qkv = tuple(f"{h}self_attn.{x}_proj.{p}" for x in "qkv")
                rules.append(Rule(f"{o}attn.qkv.{p}", qkv, (C, C, C)))
                layer = block_pairs + (cross_pairs if side == "dec" else [])
                rules += [Rule(f"{o}{ours}.{p}", (f"{h}{theirs}.{p}",)) for ours, theirs in layer]
                if side == "dec":
                    kv = (f"{h}encoder_attn.k_proj.{p}", f"{h}encoder_attn.v_proj.{p}")
                    rules.append(Rule(f"{o}cross.kv.{p}", kv, (C, C)))
    return rules


@dataclass(frozen=True)
class Family:
    """How one HF model_type maps onto ModelConfig and our parameter names."""

    architecture: str  # the HF causal-LM class, written to config.json "architectures"
    classifier: str  # the HF sequence-classification class (body + SCORE, no lm_head)
    to_config: Callable[[dict[str, Any]], ModelConfig]
    hf_config: Callable[[ModelConfig, str, str], dict[str, Any]]
    rules: Callable[[ModelConfig], list[Rule]]
    prefix: str = ""  # some checkpoints (the original gpt2) omit this prefix on body tensors


FAMILIES: dict[str, Family] = {
    "llama": Family(
        "LlamaForCausalLM",
        "LlamaForSequenceClassification",
        llama_config,
        _llama_like_hf,
        llama_rules,
    ),
    "mistral": Family(
        "MistralForCausalLM",
        "MistralForSequenceClassification",
        mistral_config,
        _llama_like_hf,
        llama_rules,
    ),
    "qwen2": Family(
        "Qwen2ForCausalLM",
        "Qwen2ForSequenceClassification",
        qwen2_config,
        _llama_like_hf,
        llama_rules,
    ),
    "gpt2": Family(
        "GPT2LMHeadModel",
        "GPT2ForSequenceClassification",
        gpt2_config,
        _gpt2_hf,
        gpt2_rules,
        "transformer.",
    ),
    "bert": Family(
        "BertForMaskedLM", "BertForSequenceClassification", bert_config, _encoder_hf, bert_rules
    ),
    "roberta": Family(
        "RobertaForMaskedLM",
        "RobertaForSequenceClassification",
        roberta_config,
        _encoder_hf,
        roberta_rules,
    ),
    "bart": Family(
        "BartForConditionalGeneration",
        "BartForSequenceClassification",
        bart_config,
        _bart_hf,
        bart_rules,
    ),
}
ENCODER_FAMILIES = ("bert", "roberta")
SEQ2SEQ_FAMILIES = ("bart",)


def encoder_head_names(model_type: str, per_token: bool) -> dict[str, str]:
    """Tensor names of an encoder's task head: out_weight/out_bias, and for a sequence
    classifier pool_weight/pool_bias (dense + tanh on the first token: BERT's pooler, RoBERTa's
    classification head)."""
    if per_token:  # *ForTokenClassification: one Linear on every position
        return {"out_weight": "classifier.weight", "out_bias": "classifier.bias"}
    if model_type == "bert":
        pool, out = "bert.pooler.dense.", "classifier."
    else:
        pool, out = "classifier.dense.", "classifier.out_proj."
    return {"pool_weight": pool + "weight", "pool_bias": pool + "bias",
            "out_weight": out + "weight", "out_bias": out + "bias"}  # fmt: skip


def token_classifier_architecture(model_type: str) -> str:
    return {"bert": "BertForTokenClassification", "roberta": "RobertaForTokenClassification"}[
        model_type
    ]


def family_for(cfg: ModelConfig) -> str | None:
    """The HF model_type that represents cfg exactly, or None (export in lmforge's own layout)."""
    standard_heads = cfg.hd * cfg.n_head == cfg.n_embd
    if cfg.is_encoder_decoder:
        return "bart" if _bart_shape(cfg, standard_heads) else None
    if not cfg.causal:
        return _encoder_family(cfg, standard_heads)
    if cfg.post_norm or cfg.emb_norm or cfg.type_vocab_size or cfg.pos_offset or cfg.mlm_head:
        return None  # decoders with encoder parts: no HF family has them
    if (cfg.norm, cfg.pos) == ("layernorm", "learned") and cfg.mlp in ("gelu", "gelu_exact"):
        gpt2_ok = cfg.bias and cfg.n_kv_head == cfg.n_head and standard_heads
        return "gpt2" if gpt2_ok and cfg.sliding_window is None else None
    if (cfg.norm, cfg.pos, cfg.mlp) != ("rmsnorm", "rope", "swiglu"):
        return None
    if cfg.sliding_window is not None:
        plain = not (cfg.bias or cfg.attn_bias) and cfg.rope_scaling is None
        return "mistral" if plain else None
    if cfg.attn_bias and not cfg.bias:
        return "qwen2" if standard_heads and cfg.rope_scaling is None else None
    return "llama"


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


def without_lm_head(rules: list[Rule]) -> list[Rule]:
    """The rules of a classifier's body: HF's classifiers have no LM (or MLM) head."""
    return [r for r in rules if not r.ours.startswith(("lm_head.", "mlm_transform."))]


def hf_to_ours(tensors: dict[str, Tensor], rules: list[Rule]) -> dict[str, Tensor]:
    """Rename/fuse HF tensors into our state dict; a missing or unexpected name is an InputError."""
    out, used = {}, set()
    for rule in rules:
        missing = [n for n in rule.hf_names if n not in tensors]
        if missing:
            raise InputError(f"checkpoint is missing tensor {missing[0]!r} (for {rule.ours})")
        parts = [tensors[n].T if rule.transpose else tensors[n] for n in rule.hf_names]
        out[rule.ours] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        used.update(rule.hf_names)
    extra = [n for n in tensors if n not in used and not n.endswith(IGNORED_SUFFIXES)]
    extra = [n for n in extra if n != "lm_head.weight"]  # some tied checkpoints store it anyway
    if extra:
        raise InputError(f"checkpoint has {len(extra)} unexpected tensor(s), e.g. {extra[0]!r}")
    return out


def ours_to_hf(state: dict[str, Tensor], rules: list[Rule]) -> dict[str, Tensor]:
    """Split/transpose our state dict into HF tensors (fresh contiguous copies, safe to save)."""
    out = {}
    for rule in rules:
        if rule.ours not in state:
            raise KeyError(f"{rule.ours} not in the state dict; merge LoRA adapters before export")
        t = state[rule.ours].detach()
        parts = t.split(list(rule.sizes), dim=0) if rule.sizes else (t,)
        for name, part in zip(rule.hf_names, parts, strict=True):
            out[name] = (part.T if rule.transpose else part).clone(
                memory_format=torch.contiguous_format
            )
    return out
