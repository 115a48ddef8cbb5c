"""bart: encoder-decoder, post-norm, positions from 2, shared embeddings (model.seq2seq).

config.json <-> ModelConfig (equal encoder and decoder widths) and the name table (the decoder's
cross-attention included).
"""

from __future__ import annotations

from typing import Any

from lmforge.errors import InputError
from lmforge.model.config import BART_SHAPE, ModelConfig
from lmforge.model.hf_families.bert import ENCODER_ACTIVATIONS
from lmforge.model.hf_families.rules import Rule, require_supported


def bart_config(hf: dict[str, Any]) -> ModelConfig:
    """BART with equal encoder/decoder widths (the shape Seq2SeqLM has)."""
    activation = require_supported(hf, "activation_function", ENCODER_ACTIVATIONS, "gelu")
    require_supported(hf, "scale_embedding", (False,), False)
    require_supported(hf, "tie_word_embeddings", (True,), True)
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


def bart_hf(cfg: ModelConfig, model_type: str, architecture: str) -> dict[str, Any]:
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
