"""llama, mistral, qwen2, qwen3: RMSNorm + RoPE + SwiGLU, differing in biases, windows and
Qwen3's per-head RMSNorm on queries and keys (q_norm/k_norm, our model.qk_norm).

config.json <-> ModelConfig (rope_theta/rope_scaling in the v4 or v5 layout) and the name table.
"""

from __future__ import annotations

from typing import Any

from lmforge.errors import InputError
from lmforge.model.config import ModelConfig
from lmforge.model.hf_families.rules import Rule, require_supported
from lmforge.model.rope import hf_rope_dict, rope_scaling_from_hf


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either the v4 (rope_theta/rope_scaling) or v5 layout;
    as in transformers 5, the rope dict's rope_theta wins over a top-level one."""
    theta = float(hf_rope_dict(hf).get("rope_theta") or hf.get("rope_theta") or 10000.0)
    return theta, rope_scaling_from_hf(hf)


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    scaling = dict(cfg.rope_scaling or {"rope_type": "default"})
    return {
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {**scaling, "rope_theta": cfg.rope_theta},
    }


def _llama_like_config(
    hf: dict[str, Any], attn_bias: bool, sliding_window: int | None, qk_norm: bool = False
) -> ModelConfig:
    require_supported(hf, "hidden_act", ("silu",), "silu")
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
        qk_norm=qk_norm,
    )


# MistralConfig's/Qwen2Config's max_position_embeddings default (LlamaConfig's is the 2048 above):
# a config.json without it means that block_size, and that original length for YaRN/llama3;
# without sliding_window a Mistral attends over 4096 tokens (null: over all of them)
MISTRAL_DEFAULTS = {"max_position_embeddings": 4096 * 32, "sliding_window": 4096}
QWEN2_DEFAULTS = {"max_position_embeddings": 32768}


def llama_config(hf: dict[str, Any]) -> ModelConfig:
    return _llama_like_config(hf, attn_bias=False, sliding_window=None)


def mistral_config(hf: dict[str, Any]) -> ModelConfig:
    hf = {**MISTRAL_DEFAULTS, **hf}
    return _llama_like_config(hf, attn_bias=False, sliding_window=hf.get("sliding_window"))


def qwen2_config(hf: dict[str, Any]) -> ModelConfig:
    require_supported(hf, "use_sliding_window", (False,), False)
    return _llama_like_config({**QWEN2_DEFAULTS, **hf}, attn_bias=True, sliding_window=None)


# Qwen3Config's defaults where they differ from _llama_like_config's fallbacks (or _qwen3_window
# reads them): a hand-written config.json that omits one means what transformers reads it as
QWEN3_DEFAULTS = {"head_dim": 128, "max_position_embeddings": 32768, "sliding_window": 4096,
                  "max_window_layers": 28}  # fmt: skip


def qwen3_config(hf: dict[str, Any]) -> ModelConfig:
    """Qwen3: bias-free, q_norm/k_norm; a sliding window only when every layer has it."""
    require_supported(hf, "attention_bias", (False,), False)  # it also biases o_proj: not ours
    hf = {**QWEN3_DEFAULTS, **hf}
    return _llama_like_config(hf, attn_bias=False, sliding_window=_qwen3_window(hf), qk_norm=True)


def _qwen3_window(hf: dict[str, Any]) -> int | None:
    """The window every layer uses (None: full attention); anything our one
    model.sliding_window cannot express (a mix of full and sliding layers, sliding layers
    without a window, another attention kind) is an InputError."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    n_layer = hf["num_hidden_layers"]
    types = hf.get("layer_types") or [
        "sliding_attention" if window is not None and i >= hf["max_window_layers"]
        else "full_attention"
        for i in range(n_layer)
    ]  # fmt: skip
    kinds = set(types)
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"} and window is not None:
        return window
    settings = {k: hf.get(k) for k in ("use_sliding_window", "sliding_window", "max_window_layers")}
    raise InputError(
        f"config.json layer_types {sorted(kinds)} with {settings}: lmforge runs one attention in "
        "every layer, all full_attention, or all sliding_attention with use_sliding_window true, "
        "a sliding_window and max_window_layers=0"
    )


def llama_like_hf(cfg: ModelConfig, model_type: str, architecture: str) -> dict[str, Any]:
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
    elif model_type == "qwen3":
        sliding = cfg.sliding_window is not None
        hf.update(
            attention_bias=False,
            use_sliding_window=sliding,
            sliding_window=cfg.sliding_window,
            max_window_layers=0 if sliding else cfg.n_layer,
            layer_types=[f"{'sliding' if sliding else 'full'}_attention"] * cfg.n_layer,
        )
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
        if cfg.qk_norm:
            rules += [Rule(o + f"attn.{x}_norm.weight", (a + f"{x}_norm.weight",)) for x in "qk"]
        for p in ["weight"] + (["bias"] if cfg.bias or cfg.attn_bias else []):
            rules.append(Rule(o + f"attn.qkv.{p}", tuple(a + f"{x}_proj.{p}" for x in "qkv"), qkv))
        for p in params:
            rules += [
                Rule(o + f"attn.proj.{p}", (a + f"o_proj.{p}",)),
                Rule(o + f"mlp.fc.{p}", (m + f"gate_proj.{p}", m + f"up_proj.{p}"), fc),
                Rule(o + f"mlp.proj.{p}", (m + f"down_proj.{p}",)),
            ]
    return rules
