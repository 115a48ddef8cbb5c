"""Hugging Face weight-name tables: a Rule maps one of our tensors to one or more HF tensors, and
the same table renames a checkpoint both ways (import: hf_to_ours, export: ours_to_hf), so the
two directions cannot drift apart. require_supported is the config.json check every family uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lmforge.errors import InputError

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


def require_supported(hf: dict[str, Any], key: str, allowed: tuple[Any, ...], default: Any) -> Any:
    """hf[key] (or default) if it is one of allowed; the value, for callers that branch on it."""
    value = hf.get(key, default)
    if value not in allowed:
        raise InputError(
            f"config.json {key}={value!r} is not supported for model_type "
            f"{hf.get('model_type')!r}; supported: {', '.join(map(repr, allowed))}"
        )
    return value


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
