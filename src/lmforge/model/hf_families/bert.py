"""bert, roberta: bidirectional post-norm encoders with the MLM head.

config.json <-> ModelConfig (RoBERTa's positions count from pad_token_id + 1), the name tables,
and the names of an encoder's task heads (sequence: pooler + classifier; token: classifier).
"""

from __future__ import annotations

from typing import Any

from lmforge.model.config import BERT_SHAPE, ModelConfig
from lmforge.model.hf_families.rules import Rule, require_supported

ENCODER_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh")


def _encoder_config(hf: dict[str, Any], pos_offset: int) -> ModelConfig:
    activation = require_supported(hf, "hidden_act", ENCODER_ACTIVATIONS, "gelu")
    require_supported(hf, "position_embedding_type", ("absolute",), "absolute")
    require_supported(hf, "is_decoder", (False,), False)
    require_supported(hf, "tie_word_embeddings", (True,), True)
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


def encoder_hf(cfg: ModelConfig, model_type: str, architecture: str) -> dict[str, Any]:
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
