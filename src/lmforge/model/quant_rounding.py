"""Symmetric absmax rounding of a weight matrix to int8 or int4 codes, and back.

int8: one scale per output row. int4: one scale per group of `group_size` input columns, codes
0..15 (value = (code - 8) * scale) packed two a byte along the input. The quantized modules
(model.quant, model.quant_embedding) and whole checkpoints (model.quant_checkpoint) round with it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmforge.errors import ConfigError

BITS = {"int8": 8, "int4": 4}


def quantize_weight(w: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor]:
    """(codes, scales): w ~= codes * scales, symmetric per row (8 bit) or per group (4 bit)."""
    out_f, in_f = w.shape
    if bits == 8:
        scale = absmax_scale(w, bits)  # (out, 1)
        return encode_weight(w, scale, bits, group_size), scale
    if in_f % group_size or group_size % 2:
        raise ConfigError(
            f"int4 quantization needs in_features ({in_f}) divisible by an even "
            f"lora.group_size ({group_size}); pick another group size"
        )
    scale = absmax_scale(w.reshape(out_f, in_f // group_size, group_size), bits)  # (out, G, 1)
    return encode_weight(w, scale, bits, group_size), scale


def code_range(bits: int) -> tuple[int, int]:
    """The signed codes' (lowest, highest): int8 is symmetric, int4 takes -8 too (code 0)."""
    qmax = 2 ** (bits - 1) - 1  # 127 or 7
    return (-qmax if bits == 8 else -qmax - 1), qmax


def absmax_scale(w: Tensor, bits: int) -> Tensor:
    """The scale that maps the largest |w| along the last dim onto the top code (keepdim)."""
    return w.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / code_range(bits)[1]


def encode_weight(w: Tensor, scale: Tensor, bits: int, group_size: int) -> Tensor:
    """w's codes under given scales (quantize_weight's layout): int8 (out, in), with a scale
    per row (out, 1) or per column (1, in); int4 (out, in / 2) two a byte, scales (out, G, 1).
    Calibrated rounding (compress.gptq) computes its own scales and writes codes through it."""
    lo, hi = code_range(bits)
    if bits == 8:
        return torch.round(w / scale).clamp(lo, hi).to(torch.int8)
    out_f, in_f = w.shape
    groups = w.reshape(out_f, in_f // group_size, group_size)
    q = torch.round(groups / scale).clamp(lo, hi).to(torch.int16) + 8  # 0..15
    q = q.reshape(out_f, in_f)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)  # (out, in/2)


def dequantize_weight(codes: Tensor, scale: Tensor, bits: int, group_size: int) -> Tensor:
    """Inverse of quantize_weight (up to rounding), in the scale's dtype."""
    if bits == 8:
        return codes.to(scale.dtype) * scale
    out_f, in_f = codes.shape[0], codes.shape[1] * 2
    q = torch.empty(out_f, in_f // 2, 2, dtype=scale.dtype, device=codes.device)
    q[..., 0], q[..., 1] = codes & 0xF, codes >> 4  # one float buffer, filled in place
    groups = q.view(out_f, in_f // group_size, group_size).sub_(8).mul_(scale)
    return groups.view(out_f, in_f)
