"""Weight-only int8/int4 quantization of a frozen nn.Linear (QLoRA, kept-quantized checkpoints).

QuantLinear keeps a frozen weight as int8 (one scale per output row) or 4-bit (one scale per
group of `group_size` input columns, two values packed per byte), so it takes 1/4 or, with
groups of 32 and their fp32 scales (5 bits a weight), 1/6.4 of its fp32 memory. Inference on
CPU runs torch's weight-only matmuls with bf16 activations (model.quant_kernels picks them);
otherwise the weight is dequantized on every forward. QLoRA trains LoRA adapters on top in full
precision. Symmetric absmax rounding (model.quant_rounding): small, readable, no custom kernels.

The rest of the quantized modules' parts each have a module, their names importable from here:
model.quant_rounding (codes and scales), model.quant_kernels (the CPU kernels' dispatch),
model.quant_module (what both modules share: the int4 kernel layout's buffers, state dicts in
our layout), model.quant_embedding (QuantEmbedding). A whole checkpoint's quantization
(`lmforge compress quantize`) and how it loads is model.quant_checkpoint.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import ConfigError
from lmforge.model import int4pack
from lmforge.model.quant_embedding import QuantEmbedding
from lmforge.model.quant_kernels import (
    KERNEL_DTYPE,
    Int4KernelLinear,
    aligned,
    cpu_kernel_input,
    int8_kernel_available,
    kernel_packable,
    uses_int8_kernel,
)
from lmforge.model.quant_module import QuantModule
from lmforge.model.quant_rounding import BITS, dequantize_weight, quantize_weight

__all__ = [
    "BITS",
    "INT4_CHUNK_WEIGHTS",
    "KERNEL_DTYPE",
    "QuantEmbedding",
    "QuantLinear",
    "dequantize_weight",
    "int8_kernel_available",
    "kernel_packable",
    "quantize_weight",
    "quantized_numel",
]

INT4_CHUNK_WEIGHTS = 1 << 22  # an int4 matmul dequantizes 4M weights (16 MB in fp32) at a time


class QuantLinear(QuantModule):
    """A frozen Linear whose weight lives as int8/int4 codes; computes in the input's dtype.

    `transposed` marks a weight its checkpoint stores as (in, out) (GPT-2's Conv1D). int8 codes
    are (out, in) with a scale per output row (out, 1), or per input column (1, in) when
    transposed; inference on CPU runs torch's int8 weight-only matmul where torch has it, with
    activations in bf16 (KERNEL_DTYPE: the rest of an fp32 model stays fp32). int4
    codes stay packed ((out, in / 2), or (in, out / 2) when transposed) and are dequantized on
    each forward, unless `kernel_packed` (a checkpoint's or QLoRA base's weight that
    kernel_packable): then the weight is held only in torch's int4 kernel layout (buffers
    int4pack, scales_and_zeros: see model.int4pack) and the forward on CPU, training included,
    runs that kernel with bf16 activations.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int = 32,
        bias: bool = False,
        transposed: bool = False,
        kernel_packed: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.transposed = bits, group_size, transposed
        self.kernel_packed = kernel_packed
        self.weight_shape = (out_features, in_features)
        rows, cols = (in_features, out_features) if transposed else (out_features, in_features)
        if kernel_packed:
            self.register_kernel_buffers(out_features, in_features, group_size)
        elif bits == 8:  # codes always (out, in): a transposed checkpoint's are transposed on load
            self.register_buffer("codes", torch.empty(out_features, in_features, dtype=torch.int8))
            self.register_buffer(
                "scale", torch.empty(1, in_features) if transposed else torch.empty(out_features, 1)
            )
        else:
            self.register_buffer("codes", torch.empty(rows, cols // 2, dtype=torch.uint8))
            self.register_buffer("scale", torch.empty(rows, cols // group_size, 1))
        self.register_buffer("bias", torch.empty(out_features) if bias else None)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, kind: str = "int8", group_size: int = 32
    ) -> QuantLinear:
        """linear's weight quantized (the QLoRA base); int4 packed for torch's CPU int4 kernel
        where kernel_packable."""
        if kind not in BITS:
            raise ConfigError(f"unknown quantization {kind!r}; valid: {', '.join(BITS)}")
        bits, weight = BITS[kind], linear.weight.detach()
        codes, scale = quantize_weight(weight.float(), bits, group_size)
        packed = kernel_packable(bits, tuple(weight.shape), group_size, weight.device)
        q = cls(linear.in_features, linear.out_features, bits, group_size, kernel_packed=packed)
        if packed:
            q.int4pack, q.scales_and_zeros = int4pack.pack(codes, scale, group_size)
        else:
            q.codes, q.scale = codes, scale
        q.bias = linear.bias.detach().clone() if linear.bias is not None else None
        return q

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (out, in); recomputed on each access."""
        if self.kernel_packed:
            return self.kernel_packed_rows(None)
        w = dequantize_weight(self.codes, self.scale, self.bits, self.group_size)
        return w.T if self.transposed and self.bits == 4 else w

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.kernel_packed:
            y = self._kernel_int4_forward(x)
            return y if bias is None else y + bias
        if self.bits == 4:
            y = self._int4_forward(x)
            return y if bias is None else y + bias
        if not uses_int8_kernel(x, self):
            return F.linear(x, self.weight.to(x.dtype), bias)
        dtype = KERNEL_DTYPE[x.dtype]
        flat = x.reshape(-1, self.in_features)  # (N, in)
        scale = self.scale.reshape(-1)
        if self.scale.shape[0] == 1:  # per input column: scale x, then plain int8 codes
            flat, scale = flat * scale.to(x.dtype), torch.ones(self.out_features)
        y = torch.ops.aten._weight_int8pack_mm(
            aligned(flat.to(dtype).contiguous()), self.codes, aligned(scale.to(dtype))
        )  # (N, out)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias

    def _kernel_int4_forward(self, x: Tensor) -> Tensor:
        """x @ weight.T through torch's int4 kernel (bf16 activations; with grad enabled too:
        Int4KernelLinear); off the kernel's ground (another device, torch.compile) through the
        weight read back from its layout."""
        if not cpu_kernel_input(x):  # chunks of output rows, like _int4_forward's
            chunks = int4pack.dequantize_chunks(*self.kernel_args(), self.layout, self.out_features)
            return torch.cat([F.linear(x, w.to(x.dtype)) for w in chunks], dim=-1)
        flat = x.reshape(-1, self.in_features)  # (N, in)
        y = Int4KernelLinear.apply(flat, *self.kernel_args(), self.out_features)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _int4_forward(self, x: Tensor) -> Tensor:
        """x @ weight.T, dequantizing INT4_CHUNK_WEIGHTS weights at a time: a vocab-wide head
        never exists in floats whole. Chunks of stored rows are output features (concatenated)
        or, transposed, input features (partial sums)."""
        rows = self.codes.shape[0]
        step = max(1, INT4_CHUNK_WEIGHTS // (self.codes.shape[1] * 2))
        starts = range(0, rows, step)
        weights = (
            dequantize_weight(
                self.codes[r : r + step], self.scale[r : r + step], 4, self.group_size
            )
            for r in starts
        )
        if self.transposed:  # (in_chunk, out) each
            return sum(
                x[..., r : r + step] @ w.to(x.dtype) for r, w in zip(starts, weights, strict=True)
            )
        return torch.cat([F.linear(x, w.to(x.dtype)) for w in weights], dim=-1)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}"


def quantized_numel(model: nn.Module) -> int:
    """How many weights the model holds as codes (a table shared by two modules counts once;
    the kernel layout's padding rows do not count): what parameter counts add, since codes are
    buffers."""
    kept = [m for m in model.modules() if isinstance(m, QuantModule)]
    return sum({_bytes_of(m.stored_codes): math.prod(m.weight_shape) for m in kept}.values())


def _bytes_of(codes: Tensor) -> object:
    """Which bytes codes are: a tied table's modules hold one tensor, or two over one storage
    once a torch.load'ed state dict is assigned (load_state_dict(assign=True))."""
    return id(codes) if codes.is_meta else (codes.device, codes.data_ptr(), tuple(codes.shape))
