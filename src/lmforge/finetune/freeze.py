"""Partial freezing and layer-wise learning rates, handed to the loop as optimizer param groups.

Freezing: embeddings, the first N blocks, and any parameter whose name matches a glob. Layer-wise
LR decay (as in ULMFiT / BEiT fine-tuning): the top of the network (final norm, lm_head) trains at
train.lr, block i at lr * decay^(n_layer - i), embeddings at lr * decay^(n_layer + 1); parameters
of a new head (names starting with `head.`) get their own rate. Weight decay never touches norms,
biases or embeddings, as in the loop's default groups.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

from pydantic import Field
from torch import nn

from lmforge.config import Section

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
HEAD_PREFIX = "head."


class FreezeConfig(Section):
    """Which parameters stay fixed and how learning rates vary by depth (the `freeze:` section)."""

    embeddings: bool = Field(False, description="freeze token (and position) embeddings")
    first_n_layers: int = Field(0, ge=0, description="freeze the first N Transformer blocks")
    patterns: list[str] = Field(
        default_factory=list, description="freeze parameters whose name matches a glob"
    )
    layer_lr_decay: float = Field(
        1.0, gt=0, le=1, description="lr multiplier per block going down (1.0 = same lr everywhere)"
    )
    head_lr: float | None = Field(
        None, gt=0, description="learning rate of a new head (classifier); default train.lr"
    )


def layer_of(name: str, n_layer: int) -> int:
    """Depth index of a parameter: 0 embeddings, 1..n_layer blocks, n_layer + 1 the top."""
    match = _BLOCK.search(name)
    if match:
        return int(match.group(1)) + 1
    if any(part.endswith("emb") for part in name.split(".")[:-1]):
        return 0
    return n_layer + 1


def apply_freeze(model: nn.Module, cfg: FreezeConfig, n_layer: int) -> int:
    """Sets requires_grad=False on the chosen parameters; returns how many tensors it froze."""
    frozen = 0
    for name, p in model.named_parameters():
        depth = layer_of(name, n_layer)
        if (
            (cfg.embeddings and depth == 0 and not name.startswith(HEAD_PREFIX))
            or (1 <= depth <= cfg.first_n_layers and _BLOCK.search(name))
            or any(fnmatch.fnmatchcase(name, pat) for pat in cfg.patterns)
        ) and p.requires_grad:
            p.requires_grad_(False)
            frozen += 1
    return frozen


def _no_decay(model: nn.Module) -> set[int]:
    ids = {id(p) for p in model.parameters() if p.ndim < 2}
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            ids.update(id(p) for p in module.parameters())
    return ids


def param_groups(
    model: nn.Module, cfg: FreezeConfig, lr: float, weight_decay: float, n_layer: int
) -> list[dict[str, Any]]:
    """Optimizer groups of the trainable parameters: one per (depth or head, decay) pair."""
    no_decay = _no_decay(model)
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if name.startswith(HEAD_PREFIX):
            key, group_lr = "head", cfg.head_lr or lr
        else:
            depth = layer_of(name, n_layer)
            key, group_lr = f"layer{depth}", lr * cfg.layer_lr_decay ** (n_layer + 1 - depth)
        decays = id(p) not in no_decay
        group = groups.setdefault(
            (key, decays),
            {"params": [], "lr": group_lr, "weight_decay": weight_decay if decays else 0.0,
             "name": key},
        )  # fmt: skip
        group["params"].append(p)
    return list(groups.values())
