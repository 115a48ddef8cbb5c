"""gpt2: LayerNorm + learned positions + GELU(tanh) + biases, Conv1D (in, out) weights.

config.json <-> ModelConfig and the name table (Conv1D weights are stored transposed).
"""

from __future__ import annotations

from typing import Any

from lmforge.model.config import ModelConfig
from lmforge.model.hf_families.rules import Rule, require_supported


def gpt2_config(hf: dict[str, Any]) -> ModelConfig:
    activation = require_supported(
        hf, "activation_function", ("gelu_new", "gelu_pytorch_tanh", "gelu"), "gelu_new"
    )
    require_supported(hf, "scale_attn_by_inverse_layer_idx", (False,), False)
    require_supported(hf, "scale_attn_weights", (True,), True)
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


def gpt2_hf(cfg: ModelConfig, model_type: str, architecture: str) -> dict[str, Any]:
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
