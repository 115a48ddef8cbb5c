"""qwen3_moe: Qwen3's attention (q_norm/k_norm) with a top-k mixture of SwiGLU experts (Qwen3-30B-A3B
and its siblings).

config.json <-> ModelConfig. The experts' width is moe_intermediate_size, which becomes our
intermediate_size (the one width every expert has); config.json's own intermediate_size is the
width of Qwen3MoeMLP, which transformers builds only for dense layers (mlp_only_layers, or layers
decoder_sparse_step skips). Our model has one kind of MLP in every layer, so a config where every
layer is sparse imports as a mixture of experts (its dense width unused, as in transformers), one
where none is imports as a dense qk_norm model, and a mix is refused. norm_topk_prob (false unless
config.json says true; Qwen3-30B-A3B says true) and router_aux_loss_coef carry over.
output_router_logits only says whether transformers' forward returns router logits and adds the
aux loss; lmforge's training always adds router_aux_loss_coef x the load-balancing loss (the
same load_balancing_loss_func as Mixtral's), and exports write it false as Mixtral's do.

Unlike Qwen3's, this config class has no layer_types or max_window_layers: use_sliding_window
slides every layer, and head_dim defaults to hidden_size / num_attention_heads. RoPE (either
config layout) is read by the Llama-like reader through model.rope, so a config.json without
max_position_embeddings gives block_size and YaRN's original length Qwen3MoeConfig's 32768.

Weights: the hub layout is `mlp.gate` (the router) and `mlp.experts.N.{gate,up,down}_proj`, what
transformers 5's save_pretrained writes. Its in-memory state dict fuses the experts as Mixtral's
does; both layouts go through the mixtral family's table and fused-expert split, with Mixtral's
`block_sparse_moe.` names rewritten to these.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from lmforge.errors import InputError
from lmforge.model.config import ModelConfig
from lmforge.model.hf_families.llama import llama_like_hf, llama_rules, mistral_config
from lmforge.model.hf_families.mixtral import hub_layout, mixtral_rules
from lmforge.model.hf_families.rules import Rule, require_supported

# Qwen3MoeConfig's defaults where they differ from _llama_like_config's fallbacks or are read here:
# a hand-written config.json that omits one means what transformers reads it as
QWEN3_MOE_DEFAULTS = {
    "vocab_size": 151936,
    "hidden_size": 2048,
    "num_hidden_layers": 24,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 32768,
    "sliding_window": 4096,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_experts_per_tok": 8,
    "norm_topk_prob": False,
    "router_aux_loss_coef": 0.001,
    "decoder_sparse_step": 1,
}
_MIXTRAL_NAME = re.compile(
    r"(model\.layers\.\d+)\.block_sparse_moe\.(gate\.|experts\.\d+\.(w[123])\.)"
)
_EXPERT_LINEAR = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def qwen3_moe_config(hf: dict[str, Any]) -> ModelConfig:
    """Qwen3-MoE: bias-free, q_norm/k_norm, every layer sparse (or none); see the module doc."""
    require_supported(hf, "attention_bias", (False,), False)  # it also biases o_proj: not ours
    # transformers reads num_local_experts as num_experts (its attribute_map); the hub writes either
    experts = hf["num_experts"] if "num_experts" in hf else hf.get("num_local_experts", 128)
    hf = {**QWEN3_MOE_DEFAULTS, **hf}
    window = hf["sliding_window"] if hf.get("use_sliding_window") else None
    cfg = replace(mistral_config({**hf, "sliding_window": window}), qk_norm=True)
    if not _every_layer_sparse(hf, experts):
        return cfg  # Qwen3MoeMLP (intermediate_size wide) in every layer: a dense Qwen3
    return replace(
        cfg,
        intermediate_size=hf["moe_intermediate_size"],
        num_experts=experts,
        num_experts_per_tok=hf["num_experts_per_tok"],
        norm_topk_prob=bool(hf["norm_topk_prob"]),
        router_aux_loss_coef=float(hf["router_aux_loss_coef"]),
    )


def _every_layer_sparse(hf: dict[str, Any], experts: int) -> bool:
    """Whether every layer is a mixture of experts (False: none is), as Qwen3MoeDecoderLayer
    chooses; a mix is an InputError naming the fields that make it."""
    step, dense_only = hf["decoder_sparse_step"], hf.get("mlp_only_layers") or []
    if not isinstance(step, int) or step < 1:
        raise InputError(f"config.json decoder_sparse_step={step!r} must be an integer >= 1")
    n_layer = hf["num_hidden_layers"]
    sparse = [
        i for i in range(n_layer) if experts > 0 and i not in dense_only and (i + 1) % step == 0
    ]
    if len(sparse) in (0, n_layer):
        return bool(sparse)
    dense = sorted(set(range(n_layer)) - set(sparse))
    raise InputError(
        f"config.json decoder_sparse_step={step} and mlp_only_layers={dense_only} make layers "
        f"{dense} dense MLPs and layers {sparse} mixtures of experts; lmforge has one kind of MLP "
        "in every layer: all sparse (decoder_sparse_step 1, mlp_only_layers []) or all dense"
    )


def qwen3_moe_hf(cfg: ModelConfig, model_type: str, architecture: str) -> dict[str, Any]:
    hf = llama_like_hf(cfg, "qwen3", architecture)  # Qwen3's attention and window fields
    for key in ("layer_types", "max_window_layers"):  # not Qwen3MoeConfig's: it slides every layer
        hf.pop(key)
    hf.update(
        model_type=model_type,
        moe_intermediate_size=cfg.intermediate_size,  # intermediate_size too: no layer is dense
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        norm_topk_prob=cfg.norm_topk_prob,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        output_router_logits=False,
    )
    return hf


def qwen3_moe_rules(cfg: ModelConfig) -> list[Rule]:
    """Mixtral's table (attention, q/k norms, router, experts) under Qwen3-MoE's hub names; a dense
    import (no sparse layer) is Qwen3's table."""
    if not cfg.num_experts:
        return llama_rules(cfg)
    return [
        replace(r, hf_names=tuple(map(_qwen3_moe_name, r.hf_names))) for r in mixtral_rules(cfg)
    ]


def qwen3_moe_layout(tensors: dict[str, Any]) -> dict[str, Any]:
    """tensors in the hub layout: fused in-memory experts split (mixtral.hub_layout), then named
    as Qwen3-MoE's hub names them."""
    return {_qwen3_moe_name(name): t for name, t in hub_layout(tensors).items()}


def _qwen3_moe_name(name: str) -> str:
    """A Mixtral hub name (block_sparse_moe.gate / .experts.N.w1|w2|w3) as Qwen3-MoE's."""
    found = _MIXTRAL_NAME.match(name)
    if found is None:
        return name
    part = found[2] if found[3] is None else found[2].replace(found[3], _EXPERT_LINEAR[found[3]])
    return f"{found[1]}.mlp.{part}{name[found.end() :]}"
