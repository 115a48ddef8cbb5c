"""Quantized checkpoints: every matrix of a state dict as int8/int4 codes, and back.

quantize_tensors() applies model.quant's rounding to every matrix of a checkpoint but its MoE
routers (`lmforge compress quantize`; quantization_plan() says which, with how many bits):
model.safetensors then holds the codes under each weight's own name plus `<name>_scale`, and
config.json's `quantization_config` (quant_method "lmforge") says which tensors are quantized
with how many bits and which modules stay float (`modules_to_not_convert`). load_pretrained() keeps them quantized by default
(read_quantized -> QuantWeight -> keep_quantized: QuantLinear / QuantEmbedding built from the
stored codes, never an fp32 matrix; int4 ones a matmul uses repacked for torch's CPU int4 kernel
where it takes them, model.int4pack) or dequantizes them for training (dequantize_tensors).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.errors import ConfigError, InputError
from lmforge.model import int4pack
from lmforge.model.quant import QuantLinear
from lmforge.model.quant_embedding import QuantEmbedding
from lmforge.model.quant_kernels import kernel_packable
from lmforge.model.quant_rounding import BITS, dequantize_weight, quantize_weight

QUANT_METHOD = "lmforge"  # quantization_config.quant_method of our checkpoints
SCALE_SUFFIX = "_scale"


def quantize_tensors(
    tensors: dict[str, Tensor],
    kind: str,
    group_size: int = 32,
    stored_transposed: Collection[str] = (),
    keep_float: Collection[str] = (),
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, quantization_config) with every floating-point matrix quantized as
    quantization_plan says."""
    config = quantization_plan(tensors, kind, group_size, stored_transposed, keep_float)
    flipped = set(config.get("flipped", ()))
    out = dict(tensors)
    for name, bits in config["bits"].items():
        t = tensors[name].T if name in flipped else tensors[name]
        out[name], out[name + SCALE_SUFFIX] = quantize_weight(t.float(), bits, group_size)
    return out, config


def quantization_plan(
    tensors: dict[str, Tensor],
    kind: str,
    group_size: int = 32,
    stored_transposed: Collection[str] = (),
    keep_float: Collection[str] = (),
) -> dict[str, Any]:
    """The quantization_config quantize_tensors writes for tensors, without rounding them (AWQ
    needs its grids before it changes the tensors it rounds).

    Every floating-point matrix is quantized but those named in keep_float (MoE routers:
    rounding one can switch a token's expert, so vLLM and llama.cpp keep them float too),
    listed by module under "modules_to_not_convert" as transformers' quantization configs do.
    int4 needs in_features divisible by group_size; a matrix that is not is kept at int8 (the
    config records each tensor's bits). Vectors (norms, biases) stay as they are. The int4
    codes of a matrix named in stored_transposed (stored (in, out), GPT-2's Conv1D) are those
    of its transpose, grouped along the input like every other weight (so they load into
    torch's int4 kernel); the config lists them under "flipped".
    """
    if kind not in BITS:
        raise ConfigError(f"unknown quantization {kind!r}; valid: {', '.join(BITS)}")
    bits_of: dict[str, int] = {}
    flipped: list[str] = []
    for name, t in tensors.items():
        if t.dim() != 2 or not t.is_floating_point() or name in keep_float:
            continue
        flip = kind == "int4" and name in stored_transposed and t.shape[0] % group_size == 0
        bits_of[name] = BITS[kind] if flip or t.shape[1] % group_size == 0 else 8
        flipped += [name] if flip else []
    config: dict[str, Any] = {"quant_method": QUANT_METHOD, "group_size": group_size}
    config["bits"] = bits_of
    if flipped:
        config["flipped"] = flipped
    kept = sorted(n.removesuffix(".weight") for n in keep_float if n in tensors)
    if kept:
        config["modules_to_not_convert"] = kept
    return config


def dequantize_tensors(
    tensors: dict[str, Tensor], config: dict[str, Any] | None, where: object = "checkpoint"
) -> dict[str, Tensor]:
    """Inverse of quantize_tensors (float32 weights); unchanged when config is None."""
    if not config:
        return tensors
    packed = read_quantized(tensors, config, where)
    return {k: v.dequantize() if isinstance(v, QuantWeight) else v for k, v in packed.items()}


@dataclass(frozen=True)
class QuantWeight:
    """One quantized matrix of a checkpoint on its way into a model, in our (out, in) layout
    unless `transposed` (int4 codes of a weight the checkpoint stores as (in, out)) or
    `flipped` (int4 codes of the transpose of a checkpoint tensor stored (in, out): ours once
    fused with the checkpoint's transpose, as GPT-2's Conv1D weights are)."""

    codes: Tensor
    scale: Tensor
    bits: int
    group_size: int
    transposed: bool = False
    flipped: bool = False

    @property
    def kernel_packable(self) -> bool:
        """Whether the weight loads repacked for torch's CPU int4 kernel (model.int4pack)."""
        return not (self.transposed or self.flipped) and kernel_packable(
            self.bits, self.shape, self.group_size, self.codes.device
        )

    @property
    def shape(self) -> tuple[int, int]:
        """The (out, in) shape of the weight the codes stand for (flipped: the shape stored)."""
        rows = self.codes.shape[0]
        cols = self.codes.shape[1] * (2 if self.bits == 4 else 1)
        return (cols, rows) if self._codes_transposed else (rows, cols)

    @property
    def _codes_transposed(self) -> bool:
        return (self.transposed or self.flipped) and self.bits == 4

    def dequantize(self) -> Tensor:
        w = dequantize_weight(self.codes, self.scale.float(), self.bits, self.group_size)
        return w.T.contiguous() if self._codes_transposed else w

    def to(self, device: torch.device | str, dtype: torch.dtype) -> QuantWeight:
        """Codes moved as they are; the scale in the model's dtype."""
        return replace(self, codes=self.codes.to(device), scale=self.scale.to(device, dtype))

    def fused(self, rest: list[QuantWeight], transpose: bool) -> QuantWeight | None:
        """self and rest as one weight, the checkpoint's parts transposed and/or concatenated
        along the output rows like an unquantized weight; None if they cannot stay quantized."""
        parts = [self, *rest]
        if any(
            (p.bits, p.group_size, p.transposed, p.flipped)
            != (self.bits, self.group_size, False, self.flipped)
            for p in parts
        ):
            return None
        if transpose and len(parts) > 1:
            return None
        if self.flipped:  # the checkpoint's transpose is what the codes already stand for
            return replace(self, flipped=False) if transpose else None
        if (
            transpose and self.bits == 8
        ):  # (in, out) codes with a scale per stored row = input column
            return replace(
                self, codes=self.codes.T.contiguous(), scale=self.scale.T, transposed=True
            )
        if transpose:
            return replace(self, transposed=True)
        codes = torch.cat([p.codes for p in parts]) if rest else self.codes
        scale = torch.cat([p.scale for p in parts]) if rest else self.scale
        return replace(self, codes=codes, scale=scale)


def read_quantized(
    tensors: dict[str, Tensor], config: dict[str, Any], where: object
) -> dict[str, Tensor | QuantWeight]:
    """The checkpoint with each quantized tensor and its scale as one QuantWeight.

    Tensors are copied into memory of their own: safetensors' load_file hands out views into
    the file's mapping (which one kept view keeps whole, and at offsets the int8 kernel cannot
    take); a copy starts on a 64-byte boundary and the mapping is released once loaded. int4
    codes and scales are left as they are: keep_quantized repacks most for the int4 kernel
    (a copy first would be freed into the heap, where it stays resident) and copies the rest.
    """
    _check_method(config, where)
    int4 = {n for n, bits in config.get("bits", {}).items() if int(bits) == 4}
    as_is = int4 | {n + SCALE_SUFFIX for n in int4}
    out: dict[str, Tensor | QuantWeight] = {
        name: t if name in as_is else t.clone() for name, t in tensors.items()
    }
    flipped = set(config.get("flipped", ()))
    for name, bits in config["bits"].items():
        scale = out.pop(name + SCALE_SUFFIX, None)
        if name not in out or scale is None:
            raise InputError(f"{where}: quantized tensor {name} or its scale is missing")
        out[name] = QuantWeight(
            out[name], scale, int(bits), config["group_size"], flipped=name in flipped
        )
    return out


def keep_quantized(model: nn.Module, state: dict[str, Any]) -> dict[str, Tensor]:
    """Swap each nn.Linear / nn.Embedding whose weight is a QuantWeight in state for a
    QuantLinear / QuantEmbedding (empty, on model's device: call under torch.device("meta"));
    returns state with their codes/scale under the new modules' names, the rest dequantized.

    A weight whose module is missing or of another shape (a config.json that is not the
    checkpoint's) is dequantized too, so load_state_dict refuses it as it refuses floats.
    A kernel_packable weight of a Linear (or of a table tied to one: lookups are no matmuls,
    so an untied table keeps our layout and fp32 scales) is repacked (into the only copy that
    stays resident), the others get memory of their own (read_quantized leaves int4 codes in
    the file's mapping); either once for a table tied to the LM head, so both modules share
    the bytes."""
    out: dict[str, Tensor] = {}
    stored: dict[int, tuple[Tensor, Tensor]] = {}  # id(codes) -> the two buffers
    modules = {
        name: _submodule(model, name.removesuffix(".weight")) if name.endswith(".weight") else None
        for name, value in state.items()
        if isinstance(value, QuantWeight)
    }
    matmul_codes = {id(state[n].codes) for n, m in modules.items() if type(m) is nn.Linear}
    for name, value in state.items():
        if not isinstance(value, QuantWeight):
            out[name] = value
            continue
        path = name.removesuffix(".weight")
        swapped = _quant_module(modules[name], value, id(value.codes) in matmul_codes)
        if swapped is None:  # not a plain Linear/Embedding weight: the module gets floats
            out[name] = value.dequantize().to(value.scale.dtype)
            continue
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, swapped)
        if id(value.codes) not in stored:
            stored[id(value.codes)] = (
                int4pack.pack(value.codes, value.scale, value.group_size)
                if swapped.kernel_packed
                else _owned(value)
            )
        names = ("int4pack", "scales_and_zeros") if swapped.kernel_packed else ("codes", "scale")
        out[f"{path}.{names[0]}"], out[f"{path}.{names[1]}"] = stored[id(value.codes)]
    return out


def _owned(value: QuantWeight) -> tuple[Tensor, Tensor]:
    """value's codes and scale in memory of their own. read_quantized copied int8 ones and left
    int4 ones in the file's mapping, which one kept tensor holds resident whole (gpt2-124m: +74
    MB); safetensors gives each tensor a storage of its own over the mapping, so a view of it
    looks like memory of its own: int4 ones are always copied."""
    if value.bits == 8:
        return value.codes, value.scale
    return value.codes.clone(), value.scale.clone()


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:  # an unexpected name: load_state_dict names it
        return None


def _quant_module(module: nn.Module | None, w: QuantWeight, in_a_matmul: bool) -> nn.Module | None:
    """The QuantLinear / QuantEmbedding standing for module, kernel-packed when a matmul uses
    the weight and the kernel takes it; None for another module or shape."""
    if type(module) not in (nn.Linear, nn.Embedding) or tuple(module.weight.shape) != w.shape:
        return None
    packed = in_a_matmul and w.kernel_packable
    if type(module) is nn.Linear:
        bias = module.bias is not None
        return QuantLinear(*reversed(w.shape), w.bits, w.group_size, bias, w.transposed, packed)
    if type(module) is nn.Embedding and not w.transposed:
        return QuantEmbedding(*w.shape, w.bits, w.group_size, packed, w.scale.dtype)
    return None


def _check_method(config: dict[str, Any], where: object) -> None:
    if config.get("quant_method") != QUANT_METHOD:
        raise InputError(
            f"{where}: quantization_config.quant_method {config.get('quant_method')!r} is not "
            f"supported; lmforge reads its own ('{QUANT_METHOD}') or unquantized checkpoints"
        )
    missing = [key for key in ("bits", "group_size") if key not in config]
    if missing:
        raise InputError(
            f"{where}: config.json's quantization_config lacks {', '.join(missing)}; quantize "
            "the original model again with `lmforge compress quantize`"
        )
