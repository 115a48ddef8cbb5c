"""`compress quantize`: int8 / int4 weight-only checkpoints, and dynamic int8 for CPU inference.

The checkpoint's matrices are rounded with lmforge.model.quant (the QLoRA base's quantizer: int8
with one scale per output row, int4 with one scale per group of input columns, two codes a byte)
and written under their own names in model.safetensors, with config.json's quantization_config
saying how; load_pretrained keeps them quantized (eval, generate, serve: int8/int4 memory, torch's
int8 and int4 matmuls on CPU) and dequantizes them for training, so the directory needs nothing
but itself.
dynamic_int8() is torch.ao's dynamic quantization (int8 weights, activations quantized per
batch, fbgemm int8 matmuls) of every nn.Linear, applied in memory after loading, since its
packed weights have no safetensors form; the stage measures both.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lmforge.artifacts import StageContext
from lmforge.common.io import atomic_path, atomic_write_json
from lmforge.compress.files import copy_mean_head, copy_side_files
from lmforge.errors import ConfigError
from lmforge.evals.lm import EvalModel
from lmforge.model.convert import hf_config_to_model_config, read_config, read_tensors
from lmforge.model.hf_families import FAMILIES
from lmforge.model.quant_checkpoint import quantize_tensors


def require_float_source(src: Path, hf: dict[str, Any]) -> None:
    """Refuse to quantize src (config.json `hf`) when it is quantized already: rounding codes
    again only loses quality."""
    if hf.get("quantization_config"):
        raise ConfigError(
            f"{src} is already quantized ({hf['quantization_config'].get('quant_method')}): "
            "method=quantize needs float weights; quantize the float checkpoint it was made from "
            "(the 'source' in the compression.json of the compress run that wrote it)"
        )


def quantize_dir(src: Path, dst: Path, scheme: str, group_size: int) -> dict[str, Any]:
    """Write src's checkpoint to dst with every matrix quantized; returns quantization_config."""
    hf = read_config(src)
    require_float_source(src, hf)
    tensors = read_tensors(src)
    flip = stored_transposed(hf, tensors)
    tensors, quant = quantize_tensors(tensors, scheme, group_size, flip)
    dst.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
    copy_side_files(src, dst)
    copy_mean_head(src, dst)  # float, beside the quantized encoder; config.json names it
    atomic_write_json(dst / "config.json", {**hf, "quantization_config": quant})
    return quant


def stored_transposed(hf: dict[str, Any], names: Iterable[str]) -> set[str]:
    """The checkpoint's weights stored (in, out), its family's transposed rules (GPT-2's
    Conv1D): int4 groups them along their input too, as torch's int4 kernel needs."""
    family = FAMILIES.get(hf.get("model_type", ""))
    if family is None:
        return set()
    rules = family.rules(hf_config_to_model_config(hf))
    conv1d = {n for rule in rules if rule.transpose for n in rule.hf_names}
    return {n for n in names if n in conv1d or family.prefix + n in conv1d}


def dynamic_int8(model: nn.Module) -> nn.Module:
    """model with every nn.Linear replaced by torch.ao's dynamically quantized int8 Linear (CPU)."""
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def quantize_method(
    cfg: Any, ctx: StageContext, src: Path, original: EvalModel, texts: list[str] | None
) -> dict[str, Any]:
    """final/ (the quantized directory, reloaded and measured) and the dynamic int8 numbers."""
    from lmforge.compress.measure import model_report

    settings = cfg.quantize
    with ctx.atomic_path(ctx.out / "final") as tmp:
        quant = quantize_dir(src, tmp, settings.scheme, settings.group_size)
    final = ctx.out / "final"
    after = model_report(EvalModel.load(final), final, texts, cfg.speed)
    dyn = EvalModel("dynamic-int8", src, dynamic_int8(original.model), original.files)
    dynamic = model_report(dyn, src, texts, cfg.speed)
    dynamic.pop("weights_bytes")  # in memory only: nothing on disk to measure
    bits = list(quant["bits"].values())
    return {
        "after": after,
        "quantization": {
            "scheme": settings.scheme,
            "group_size": settings.group_size,
            "int8_tensors": bits.count(8),
            "int4_tensors": bits.count(4),
        },
        "dynamic_int8": dynamic,
    }
