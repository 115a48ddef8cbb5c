"""mixtral: Mistral's attention with a top-k mixture of SwiGLU experts in place of every MLP.

config.json <-> ModelConfig (num_local_experts -> num_experts; Mixtral always renormalises the
top-k weights, so only norm_topk_prob=True is this family) and the name table, which uses the hub
layout: per-expert `block_sparse_moe.experts.N.w1/w2/w3` (gate, down, up) and
`block_sparse_moe.gate` (the router). That is what transformers 5 writes with save_pretrained
and reads back through its conversion mapping. Its in-memory state dict fuses the experts
instead (`mlp.experts.gate_up_proj` (E, 2I, C), `mlp.experts.down_proj` (E, C, I), `mlp.gate`);
a checkpoint saved in that layout is rewritten to the hub names by hub_layout before the table.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from torch import Tensor

from lmforge.errors import InputError
from lmforge.model.config import ModelConfig
from lmforge.model.hf_families.llama import llama_like_hf, llama_rules, mistral_config
from lmforge.model.hf_families.rules import Rule

_FUSED = re.compile(r"(model\.layers\.\d+)\.mlp\.(experts\.gate_up_proj|experts\.down_proj|gate\.)")


# MixtralConfig's defaults for what is read here or differs from mistral_config's: a config.json
# that omits one means what transformers reads it as (Mixtral-8x7B's shape, top-2 of 8 experts,
# rms_norm_eps 1e-5, rope_theta 1e6 unless a rope dict has one, no sliding_window full attention)
MIXTRAL_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1e6,
    "sliding_window": None,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "router_aux_loss_coef": 0.001,
}


def mixtral_config(hf: dict[str, Any]) -> ModelConfig:
    hf = {**MIXTRAL_DEFAULTS, **hf}
    return replace(
        mistral_config(hf),
        num_experts=hf["num_local_experts"],
        num_experts_per_tok=hf["num_experts_per_tok"],
        norm_topk_prob=True,
        router_aux_loss_coef=float(hf["router_aux_loss_coef"]),
    )


def mixtral_hf(cfg: ModelConfig, model_type: str, architecture: str) -> dict[str, Any]:
    hf = llama_like_hf(cfg, "mistral", architecture)  # Mistral's attention fields
    hf.update(
        model_type=model_type,
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        router_jitter_noise=0.0,
        output_router_logits=False,
    )
    return hf


def mixtral_rules(cfg: ModelConfig) -> list[Rule]:
    """Llama's attention and norm rules, and the router and experts in the hub layout."""
    rules = [r for r in llama_rules(cfg) if ".mlp." not in r.ours]
    fc = (cfg.intermediate_size, cfg.intermediate_size)
    for i in range(cfg.n_layer):
        o, m = f"blocks.{i}.mlp.", f"model.layers.{i}.block_sparse_moe."
        rules.append(Rule(o + "router.weight", (m + "gate.weight",)))
        for e in range(cfg.num_experts):
            w = f"{m}experts.{e}."
            rules += [
                Rule(o + f"experts.{e}.fc.weight", (w + "w1.weight", w + "w3.weight"), fc),
                Rule(o + f"experts.{e}.proj.weight", (w + "w2.weight",)),
            ]
    return rules


def hub_layout(tensors: dict[str, Any]) -> dict[str, Any]:
    """tensors with transformers' fused in-memory expert tensors split into the hub layout's
    per-expert w1/w3 (gate, up) and w2 (down); a checkpoint already in the hub layout is returned
    as it is."""
    out = {}
    for name, t in tensors.items():
        found = _FUSED.match(name)
        if found is None:
            out[name] = t
            continue
        moe = f"{found[1]}.block_sparse_moe."
        if found[2] == "gate.":
            out[moe + name[found.start(2) :]] = t
            continue
        if not isinstance(t, Tensor) or t.dim() != 3:
            raise InputError(
                f"tensor {name!r} should be a float (experts, rows, cols) tensor; quantize the "
                "checkpoint saved in the hub layout (save_pretrained) instead"
            )
        for e, expert in enumerate(t.unbind(0)):
            w = f"{moe}experts.{e}."
            if found[2] == "experts.down_proj":
                out[w + "w2.weight"] = expert
            else:
                out[w + "w1.weight"], out[w + "w3.weight"] = expert.chunk(2, dim=0)
    return out
