"""Builders for the multi-LoRA serving tests: a non-zero PEFT adapter over a served base model
directory, and the merged model directory that adapter equals."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lmforge.finetune.lora import LoraConfig, inject, lora_modules, merge, save_peft_adapter
from lmforge.model.convert import load_pretrained, save_pretrained
from lmforge.tokenizer.files import copy_tokenizer_files


def make_adapter(
    base_dir: Path, out: Path, seed: int, r: int = 4, targets: list[str] | None = None
) -> tuple[Path, Path]:
    """(adapter dir, merged model dir): LoRA on base_dir with B drawn non-zero (as if trained),
    saved in PEFT's format, and the same model merged, with the base's tokenizer files."""
    model = load_pretrained(base_dir, device="cpu", dtype=torch.float32)
    cfg = LoraConfig(r=r, alpha=2.0 * r, **({"targets": targets} if targets else {}))
    inject(model, cfg)
    torch.manual_seed(seed)
    for module in lora_modules(model).values():
        nn.init.normal_(module.lora_B.weight, std=0.4)
    adapter = save_peft_adapter(model, out / "adapter", base_model=str(base_dir))
    merged = out / "merged"
    save_pretrained(merge(model), merged)
    copy_tokenizer_files(base_dir, merged)
    return adapter, merged


def two_adapters(base_dir: Path, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name -> (adapter dir, merged dir): a1 on every default target (r=4), a2 on the attention
    only (r=2: ranks pad, and the MLPs are the base's for it)."""
    a1 = make_adapter(base_dir, tmp_path_factory.mktemp("a1"), seed=1)
    a2 = make_adapter(base_dir, tmp_path_factory.mktemp("a2"), seed=2, r=2,
                      targets=["attn.qkv", "attn.proj"])  # fmt: skip
    return {"a1": a1, "a2": a2}
