"""Weight-only quantization of a frozen nn.Linear, for QLoRA-style fine-tuning.

The base weight is stored as int8 (one scale per output row) or 4-bit (one scale per group of
`group_size` input columns, two values packed per byte) and dequantized on every forward, so a
frozen base takes 1/4 or ~1/7 of its fp32 memory while LoRA adapters on top train in full
precision. Symmetric absmax rounding: small, readable, no custom kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import ConfigError

BITS = {"int8": 8, "int4": 4}


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
