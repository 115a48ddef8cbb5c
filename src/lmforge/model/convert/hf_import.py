"""Import: a checkpoint's config.json and tensors (HF families' names, or lmforge's own layout)
as a ModelConfig and our state dict; lmforge-quantized weights stay quantized (QuantWeight) when
kept, else are dequantized."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lmforge.errors import InputError
from lmforge.model.config import ModelConfig
from lmforge.model.convert.files import read_tensors
from lmforge.model.hf_families import ENCODER_FAMILIES, FAMILIES
from lmforge.model.hf_families.rules import SCORE, Rule, hf_to_ours, without_lm_head
from lmforge.model.quant_checkpoint import QuantWeight, dequantize_tensors, read_quantized

log = logging.getLogger(__name__)

NATIVE = "lmforge"  # model_type of exports in our own layout
SUPPORTED_MODEL_TYPES = (*FAMILIES, "t5", NATIVE)
QuantizedLoad = Literal["keep", "dequantize"]
QUANTIZED_LOADS: tuple[str, ...] = ("keep", "dequantize")


# Training-only fields HF configs do not carry; taken from an export's "lmforge" key when present.
TRAINING_FIELDS = ("dropout", "init_std", "router_z_loss_coef")


def hf_config_to_model_config(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a config.json dict.

    The HF fields are the source of truth for the architecture (a checkpoint edited or resized by
    transformers stays consistent); our own "lmforge" key only fills the training-only fields.
    """
    model_type = hf.get("model_type")
    if model_type == NATIVE:
        return ModelConfig.from_dict(hf[NATIVE])
    if model_type not in FAMILIES:
        raise InputError(
            f"config.json model_type {model_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    try:
        cfg = FAMILIES[model_type].to_config(hf)
    except KeyError as err:
        raise InputError(f"config.json (model_type {model_type}) lacks key {err}") from None
    ours = hf.get(NATIVE) or {}
    return replace(cfg, **{k: ours[k] for k in TRAINING_FIELDS if k in ours})


def checkpoint_state(
    model_dir: Path, hf: dict[str, Any], quantized: QuantizedLoad
) -> tuple[ModelConfig, dict[str, Tensor | QuantWeight]]:
    """The ModelConfig and our state dict (quantized weights as QuantWeight when kept) of a
    checkpoint, its lm_head tied or, for a classifier without one, zeros."""
    try:
        cfg = hf_config_to_model_config(hf)
    except InputError as err:  # an unsupported or incomplete config.json: say whose
        raise InputError(f"{model_dir}: {err}") from None
    quant = hf.get("quantization_config")
    if quant and quantized == "keep":
        tensors = read_quantized(read_tensors(model_dir), quant, model_dir)
    else:
        tensors = dequantize_tensors(read_tensors(model_dir), quant, model_dir)
    score = tensors.pop(SCORE, None)  # a sequence classifier's head: load_classifier reads it
    model_type = hf.get("model_type")
    if model_type in ENCODER_FAMILIES:
        cfg, tensors = _encoder_body(cfg, tensors, model_type)
    if model_type == NATIVE:
        state = tensors
    else:
        family = FAMILIES[model_type]
        if family.prefix:
            tensors = {_with_prefix(k, family.prefix): v for k, v in tensors.items()}
        if family.renames:
            tensors = family.renames(tensors)
        rules = family.rules(cfg)
        try:
            state = _to_ours(tensors, rules if score is None else without_lm_head(rules))
        except InputError as err:  # a tensor missing or unexpected: say whose
            raise InputError(f"{model_dir}: {err}") from None
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    elif "lm_head.weight" not in state:
        log.warning(
            "%s is a classifier without an LM head: next-token scores are uniform", model_dir
        )
        state["lm_head.weight"] = torch.zeros(state["tok_emb.weight"].shape)
    return cfg, state


def _to_ours(tensors: dict[str, Any], rules: list[Rule]) -> dict[str, Any]:
    """hf_to_ours, with the quantized weights a rule takes kept quantized (QuantWeight.fused);
    ones that cannot stay quantized (mixed bits in one fused weight) are dequantized."""
    kept: dict[str, QuantWeight] = {}
    for rule in rules:
        parts = [tensors.get(n) for n in rule.hf_names]
        if all(isinstance(p, QuantWeight) for p in parts):
            fused = parts[0].fused(parts[1:], rule.transpose)
            if fused is not None:
                kept[rule.ours] = fused
    used = {n for rule in rules if rule.ours in kept for n in rule.hf_names}
    needed = {n for rule in rules if rule.ours not in kept for n in rule.hf_names}
    rest = {  # a name no rule takes (ignored or unexpected) is only named, never computed on
        n: v.dequantize() if n in needed and isinstance(v, QuantWeight) else v
        for n, v in tensors.items()
        if n not in used
    }
    state = hf_to_ours(rest, [rule for rule in rules if rule.ours not in kept])
    return {**state, **kept}


def _encoder_body(
    cfg: ModelConfig, tensors: dict[str, Tensor], model_type: str
) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The encoder's body tensors (pooler and task heads set aside), and cfg with mlm_head off
    when the checkpoint has no MLM head; unprefixed (bare BertModel) names get the prefix."""
    prefix = f"{model_type}."
    heads = ("classifier.", "cls.", "lm_head.")
    tensors = {k if k.startswith((prefix, *heads)) else prefix + k: v for k, v in tensors.items()}
    body = {
        k: v for k, v in tensors.items() if not k.startswith((f"{prefix}pooler.", "classifier."))
    }
    has_mlm = any(k.startswith(("cls.predictions.", "lm_head.")) for k in body)
    return replace(cfg, mlm_head=has_mlm), body


def _with_prefix(name: str, prefix: str) -> str:
    return name if name.startswith(prefix) or name == "lm_head.weight" else prefix + name
