"""Weight-only int8/int4 quantization: of a frozen nn.Linear (QLoRA) and of a whole checkpoint.

QuantLinear keeps a frozen base weight as int8 (one scale per output row) or 4-bit (one scale per group of
`group_size` input columns, two values packed per byte) and dequantized on every forward, so a
frozen base takes 1/4 or ~1/7 of its fp32 memory while LoRA adapters on top train in full
precision. Symmetric absmax rounding: small, readable, no custom kernels.

quantize_tensors() applies the same rounding to every matrix of a checkpoint (`lmforge compress
quantize`): model.safetensors then holds the codes under each weight's own name plus
`<name>_scale`, and config.json's `quantization_config` (quant_method "lmforge") says which
tensors are quantized with how many bits. load_pretrained() dequantizes them on load
(dequantize_tensors), so a quantized directory needs nothing but itself.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import ConfigError, InputError

BITS = {"int8": 8, "int4": 4}
QUANT_METHOD = "lmforge"  # quantization_config.quant_method of our checkpoints
SCALE_SUFFIX = "_scale"


def quantize_weight(w: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor]:
    """(codes, scales): w ~= codes * scales, symmetric per row (8 bit) or per group (4 bit)."""
    out_f, in_f = w.shape
    qmax = 2 ** (bits - 1) - 1  # 127 or 7
    if bits == 8:
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / qmax  # (out, 1)
        return torch.round(w / scale).clamp(-qmax, qmax).to(torch.int8), scale
    if in_f % group_size or group_size % 2:
        raise ConfigError(
            f"int4 quantization needs in_features ({in_f}) divisible by an even "
            f"lora.group_size ({group_size}); pick another group size"
        )
    groups = w.reshape(out_f, in_f // group_size, group_size)
    scale = groups.abs().amax(dim=2, keepdim=True).clamp_min(1e-12) / qmax  # (out, G, 1)
    q = torch.round(groups / scale).clamp(-qmax - 1, qmax).to(torch.int16) + 8  # 0..15
    q = q.reshape(out_f, in_f)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)  # (out, in/2)
    return packed, scale


def dequantize_weight(codes: Tensor, scale: Tensor, bits: int, group_size: int) -> Tensor:
    """Inverse of quantize_weight (up to rounding), in the scale's dtype."""
    if bits == 8:
        return codes.to(scale.dtype) * scale
    lo = (codes & 0xF).to(torch.int16) - 8
    hi = (codes >> 4).to(torch.int16) - 8
    q = torch.stack([lo, hi], dim=-1).reshape(codes.shape[0], -1)  # (out, in)
    out_f, in_f = q.shape
    groups = q.reshape(out_f, in_f // group_size, group_size).to(scale.dtype)
    return (groups * scale).reshape(out_f, in_f)


class QuantLinear(nn.Module):
    """A frozen Linear whose weight lives as int8/int4 codes; computes in the scale's dtype."""

    def __init__(self, linear: nn.Linear, kind: str = "int8", group_size: int = 32) -> None:
        super().__init__()
        if kind not in BITS:
            raise ConfigError(f"unknown quantization {kind!r}; valid: {', '.join(BITS)}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.group_size = BITS[kind], group_size
        codes, scale = quantize_weight(linear.weight.detach().float(), self.bits, group_size)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (out, in); recomputed on each access."""
        return dequantize_weight(self.codes, self.scale, self.bits, self.group_size)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}"


def quantize_tensors(
    tensors: dict[str, Tensor], kind: str, group_size: int = 32
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, quantization_config) with every floating-point matrix quantized.

    int4 needs in_features divisible by group_size; a matrix that is not is kept at int8 (the
    config records each tensor's bits). Vectors (norms, biases) stay as they are.
    """
    if kind not in BITS:
        raise ConfigError(f"unknown quantization {kind!r}; valid: {', '.join(BITS)}")
    out: dict[str, Tensor] = {}
    bits_of: dict[str, int] = {}
    for name, t in tensors.items():
        if t.dim() != 2 or not t.is_floating_point():
            out[name] = t
            continue
        bits = BITS[kind] if t.shape[1] % group_size == 0 else 8
        codes, scale = quantize_weight(t.float(), bits, group_size)
        out[name], out[name + SCALE_SUFFIX] = codes, scale
        bits_of[name] = bits
    config = {"quant_method": QUANT_METHOD, "group_size": group_size, "bits": bits_of}
    return out, config


def dequantize_tensors(
    tensors: dict[str, Tensor], config: dict[str, Any] | None, where: object = "checkpoint"
) -> dict[str, Tensor]:
    """Inverse of quantize_tensors (float32 weights); unchanged when config is None."""
    if not config:
        return tensors
    if config.get("quant_method") != QUANT_METHOD:
        raise InputError(
            f"{where}: quantization_config.quant_method {config.get('quant_method')!r} is not "
            f"supported; lmforge reads its own ('{QUANT_METHOD}') or unquantized checkpoints"
        )
    out = dict(tensors)
    for name, bits in config["bits"].items():
        scale = out.pop(name + SCALE_SUFFIX, None)
        if name not in out or scale is None:
            raise InputError(f"{where}: quantized tensor {name} or its scale is missing")
        out[name] = dequantize_weight(out[name], scale.float(), int(bits), config["group_size"])
    return out
