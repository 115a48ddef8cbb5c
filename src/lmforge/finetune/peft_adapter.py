"""Reading a PEFT LoRA adapter directory as exact updates of our model's linears.

One reading for everything that loads an adapter (finetune/lora.load_peft_adapter for training
or merging on, serve/lora_adapters.read_adapter for serving): the directory is our own export
(finetune/lora.save_peft_adapter) or Hugging Face PEFT's for a Llama, Qwen2 or GPT-2 we import,
its modules mapped onto ours by the export's name table. A fused linear of ours (q/k/v,
gate/up) from separate PEFT modules keeps one A when the parts share it (our export writes it
so) and otherwise stacks the parts' A and places their B block-diagonally, rank the sum of
theirs: the update is exact either way; a part PEFT did not adapt (its default targets of a
Llama are q_proj and v_proj) adds nothing. Whatever cannot be read exactly is an InputError
saying what: DoRA, trained biases or lora_bias, rank/alpha patterns, modules_to_save, layer
replication, tensors other than LoRA A/B (trainable tokens, embedding LoRA), another shape or
rank, a model with no Hugging Face family. The weights are read into memory, not mapped.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.common.json_cache import read_json_object
from lmforge.errors import InputError

Update = tuple[Tensor, Tensor]  # (A (rank, in), B (out, rank)), float32, the scaling not in B


def read_peft_adapter(adapter_dir: Path) -> tuple[dict, dict[str, Tensor]]:
    """(adapter_config.json, adapter_model.safetensors' tensors) of a PEFT adapter directory;
    a missing file or an unreadable config is an InputError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    config = read_peft_config(adapter_dir)
    weights_path = Path(adapter_dir) / "adapter_model.safetensors"
    _require(weights_path)
    try:  # read into memory, not mapped: a file rewritten in place later (a trainer saving to
        # the same directory) must not pull pages from under a served adapter (SIGBUS)
        return config, load(weights_path.read_bytes())
    except (SafetensorError, OSError) as exc:  # a truncated or foreign file
        raise InputError(f"{weights_path} is not a readable safetensors file: {exc}") from None


def read_peft_config(adapter_dir: Path) -> dict[str, Any]:
    """adapter_config.json of a PEFT adapter directory, checked to be a LoRA config (the one
    reader: serving reads it alone first, to find the adapter's base)."""
    config_path = Path(adapter_dir) / "adapter_config.json"
    _require(config_path)
    config = read_json_object(config_path)  # json_cache: serving reads it twice per adapter
    if "r" not in config or "lora_alpha" not in config:
        raise InputError(f"{config_path} has no r / lora_alpha: not a LoRA adapter config")
    return config


def _require(path: Path) -> None:
    if not path.is_file():
        raise InputError(
            f"{path} is missing: a PEFT adapter directory holds adapter_config.json and "
            "adapter_model.safetensors (lmforge finetune --method lora writes them)"
        )


def peft_scaling(config: dict[str, Any]) -> float:
    """PEFT's factor on B A x: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def refuse_inexact(config: dict[str, Any]) -> None:
    """InputError for what a plain LoRA update (base + scaling * B A) cannot reproduce."""
    refused = [
        (config.get("peft_type", "LORA") != "LORA", f"peft_type {config.get('peft_type')!r}"),
        (bool(config.get("use_dora")), "use_dora (DoRA)"),
        (config.get("bias", "none") != "none", f"bias {config.get('bias')!r} (trained biases)"),
        (bool(config.get("rank_pattern") or config.get("alpha_pattern")), "rank/alpha patterns"),
        (bool(config.get("lora_bias")), "lora_bias (a bias on lora_B)"),
        (bool(config.get("layer_replication")), "layer_replication (repeated layers)"),
        (bool(config.get("modules_to_save")),
         f"modules_to_save {config.get('modules_to_save')} (whole replaced layers)"),
    ]  # fmt: skip
    for bad, what in refused:
        if bad:
            raise InputError(f"its adapter_config.json asks for {what}, which lmforge's LoRA "
                             "loading does not support; merge it with Hugging Face PEFT "
                             "(merge_and_unload) and use the merged model instead")  # fmt: skip


def peft_module_pairs(model: nn.Module, saved: dict[str, Tensor]) -> dict[str, list[Update]]:
    """Our linear's name -> its PEFT (lora_A, lora_B) pairs, one per Hugging Face module it
    fuses (q/k/v, gate/up), in the order the export's name table concatenates them. Adapted
    modules that are not in the model's table are an InputError naming one."""
    from lmforge.model.hf_families import FAMILIES, family_for

    embedding = sorted(k for k in saved if ".lora_embedding_" in k)
    if embedding:
        raise InputError(f"the adapter adapts an embedding ({embedding[0]}); only linear layers "
                         "load as LoRA here: merge it with Hugging Face PEFT instead")  # fmt: skip
    unread = sorted(k for k in saved if not k.endswith((".lora_A.weight", ".lora_B.weight")))
    if unread:  # a newer PEFT feature (trainable tokens, lora_bias, ...) would be dropped
        raise InputError(f"the adapter's weights hold {unread[0]}, which is not a LoRA A or B "
                         "matrix; merge it with Hugging Face PEFT instead")  # fmt: skip
    adapted = {k.removeprefix("base_model.model.").split(".lora_")[0] for k in saved}
    family = family_for(model.config)
    if family is None:
        raise InputError("this model has no Hugging Face equivalent, whose module names a PEFT "
                         "adapter uses; load adapters on a llama/mistral/qwen2/gpt2-style "
                         "model")  # fmt: skip
    pairs: dict[str, list[Update]] = {}
    used: set[str] = set()
    for rule in FAMILIES[family].rules(model.config):
        hf = [h.removesuffix(".weight") for h in rule.hf_names]
        if not rule.ours.endswith(".weight") or not any(h in adapted for h in hf):
            continue
        keys = [f"base_model.model.{h}" for h in hf if h in adapted]
        absent = [f"{k}.lora_{ab}.weight" for k in keys for ab in "AB"
                  if f"{k}.lora_{ab}.weight" not in saved]  # fmt: skip
        if absent:
            raise InputError(f"the adapter's weights lack {absent[0]}; re-export the adapter")
        in_f = saved[f"{keys[0]}.lora_A.weight"].size(1)
        pairs[rule.ours.removesuffix(".weight")] = [
            (
                saved[f"base_model.model.{h}.lora_A.weight"],
                saved[f"base_model.model.{h}.lora_B.weight"],
            )
            if h in adapted  # else a part the adapter leaves alone (PEFT's q_proj/v_proj only):
            else (torch.zeros(0, in_f), torch.zeros(rule.sizes[i], 0))  # no update, rank 0
            for i, h in enumerate(hf)
        ]
        used.update(hf)
    unknown = sorted(adapted - used)
    if unknown:
        raise InputError(
            f"the adapter adapts {unknown[0]}, which this model does not have: it was trained "
            "on another architecture"
        )
    return pairs


def read_peft_updates(model: nn.Module, adapter_dir: Path) -> tuple[dict[str, Update], dict]:
    """Our linear's name -> its exact unscaled (A, B) (see module), and adapter_config.json
    (peft_scaling(config) is the factor on B A); InputError when it cannot be read exactly."""
    config, saved = read_peft_adapter(adapter_dir)
    refuse_inexact(config)
    pairs = peft_module_pairs(model, saved)
    if not pairs:
        raise InputError(f"{adapter_dir} adapts no linear layer of this model")
    updates = {}
    for module, parts in pairs.items():
        _check_shapes(module, parts, int(config["r"]), model.get_submodule(module))
        updates[module] = fuse_parts(parts)
    return updates, config


def _check_shapes(module: str, parts: list[Update], r: int, linear: nn.Module) -> None:
    if not isinstance(getattr(linear, "in_features", None), int):
        raise InputError(f"the adapter adapts {module}, a {type(linear).__name__} of this "
                         "model, not a linear layer")  # fmt: skip
    in_f, out_f = linear.in_features, linear.out_features
    rows = sum(b.size(0) for _, b in parts)
    for a, b in parts:
        if a.shape[0] == 0:  # a part not adapted
            continue
        if a.shape[0] != r or b.shape[1] != r:
            raise InputError(
                f"{module}'s lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not "
                f"have its adapter_config.json's rank r={r}; re-export the adapter"
            )
        if a.shape[1] != in_f:
            raise InputError(
                f"{module} takes {in_f} inputs on this base but the adapter's lora_A "
                f"has {a.shape[1]}: it was trained on another base (another size); use it "
                "with that base"
            )
    if rows != out_f:
        raise InputError(
            f"{module} gives {out_f} outputs on this base but the adapter's lora_B "
            f"rows sum to {rows}: it was trained on another base; use it with that base"
        )


def fuse_parts(parts: list[Update]) -> Update:
    """One exact (A, B) for the parts of a fused linear (see module); a part of rank 0 (not
    adapted) adds zero rows to B."""
    adapted = [a for a, _ in parts if a.size(0)]
    if all(torch.equal(a, adapted[0]) for a in adapted):
        rank = adapted[0].size(0)
        b = [b.float() if b.size(1) else torch.zeros(b.size(0), rank) for _, b in parts]
        return adapted[0].float(), torch.cat(b)
    a = torch.cat([a.float() for a, _ in parts])
    return a, torch.block_diag(*[b.float() for _, b in parts])
