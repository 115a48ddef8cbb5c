"""Which CPU kernel a quantized matmul takes, and the int4 kernel's autograd function.

torch's weight-only matmuls run on CPU with bf16 activations: int8's aten._weight_int8pack_mm
for inference, int4's aten._weight_int4pack_mm_for_cpu on weights packed into its layout
(model.int4pack), with grad enabled too (Int4KernelLinear: its backward reads the frozen weight
back for the input's gradient, a chunk of rows at a time). Elsewhere (int8 with grad enabled,
GPU, torch.compile/export, a torch without the kernel, a group size it lacks) model.quant's
modules dequantize their weight instead.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lmforge.model import int4pack

if TYPE_CHECKING:
    from lmforge.model.quant import QuantLinear


@functools.cache
def int8_kernel_available() -> bool:
    """Whether torch has the CPU int8 weight-only matmul (aten._weight_int8pack_mm) and it runs."""
    op = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
    if op is None:
        return False
    try:
        bf16 = torch.bfloat16  # the probe is shaped like every real call (see uses_int8_kernel)
        got = op(
            torch.ones(1, 16, dtype=bf16),
            torch.ones(4, 16, dtype=torch.int8),
            torch.full((4,), 0.5, dtype=bf16),
        )
    except (RuntimeError, NotImplementedError, TypeError):  # no kernel here, other signature
        return False
    return got.shape == (1, 4) and bool((got == 8).all())  # 16 ones * 0.5 per output


# torch's CPU int8 kernel is vectorized for bf16/fp16 activations only: with fp32 ones it runs
# ~10x slower than fp32 F.linear (torch 2.13, measured), so fp32 activations go in as bf16.
KERNEL_DTYPE = {torch.float32: torch.bfloat16, torch.bfloat16: torch.bfloat16,
                torch.float16: torch.float16}  # fmt: skip


def aligned(t: Tensor) -> Tensor:
    """t in memory that starts on a 64-byte boundary: torch's int8 kernel crashes (SIGSEGV)
    on operands that do not (a view, a tensor inside a safetensors buffer)."""
    return t if t.data_ptr() % 64 == 0 else t.clone()


def tracing() -> bool:
    """Under torch.compile or torch.export. torch.compiler.is_exporting is newer than the
    torch>=2.6 we take (pytorch#142425, December 2024), and is_compiling covers export too."""
    exporting = getattr(torch.compiler, "is_exporting", None)
    return torch.compiler.is_compiling() or (exporting is not None and exporting())


def cpu_kernel_input(x: Tensor) -> bool:
    """Whether x can go through a CPU kernel: on CPU, outside torch.compile/export (no
    data_ptr), in a float dtype KERNEL_DTYPE takes."""
    return not tracing() and x.device.type == "cpu" and x.dtype in KERNEL_DTYPE


def _inference_on_cpu(x: Tensor) -> bool:
    """Whether x goes through a CPU kernel that has no backward: inference only."""
    return cpu_kernel_input(x) and not torch.is_grad_enabled()


def uses_int8_kernel(x: Tensor, layer: QuantLinear) -> bool:
    """The int8 kernel serves inference (no_grad / inference_mode) on CPU; with grad enabled
    (QLoRA training) the weight is dequantized, so the frozen base computes in the input's dtype
    even where the input needs no gradient (the first block's, below every adapter). The kernel
    also crashes unless in_features is a multiple of 16 (torch 2.13, measured)."""
    return (
        layer.bits == 8
        and _inference_on_cpu(x)
        and layer.in_features % 16 == 0
        and layer.codes.data_ptr() % 64 == 0
        and int8_kernel_available()
    )


def kernel_packable(bits: int, shape: tuple[int, int], group_size: int, device: object) -> bool:
    """Whether an int4 weight of this (out, in) shape on `device` is packed for torch's CPU
    int4 kernel (model.int4pack): a CPU weight in a group size and width the kernel takes, on a
    torch whose kernel works here."""
    return (
        bits == 4
        and torch.device(device).type == "cpu"
        and int4pack.packable(shape[1], group_size)
        and int4pack.int4pack_layout() is not None
    )


class Int4KernelLinear(torch.autograd.Function):
    """x (N, in) @ a frozen kernel-packed int4 weight's transpose: the forward through torch's
    int4 kernel (bf16 activations, the output in x's dtype); the backward gives x's gradient only
    (the weight is frozen), grad @ weight in grad's dtype (summed in float32), the weight read
    back a chunk of rows at a time: nothing but the packed bytes is kept between the two."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, packed: Tensor, scales_and_zeros: Tensor, group_size: int, out_features: int
    ) -> Tensor:
        ctx.save_for_backward(packed, scales_and_zeros)
        ctx.group_size, ctx.out_features = group_size, out_features
        flat = x.to(torch.bfloat16).contiguous()
        return int4pack.matmul(flat, packed, scales_and_zeros, group_size, out_features).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, None]:  # type: ignore[override]
        packed, scales_and_zeros = ctx.saved_tensors
        chunks = int4pack.dequantize_chunks(
            packed, scales_and_zeros, ctx.group_size, int4pack.int4pack_layout(), ctx.out_features
        )
        # summed in float32 at least, rounded to grad's dtype once: bf16 partial sums lost 5x
        # F.linear's accuracy over 32 chunks
        acc = torch.promote_types(grad.dtype, torch.float32)
        grad_x = grad.new_zeros(grad.shape[0], packed.shape[1] * 2, dtype=acc)
        start = 0
        for w in chunks:  # grad @ weight = the sum over chunks of output rows
            grad_x.addmm_(grad[:, start : start + w.shape[0]].to(acc), w.to(acc))
            start += w.shape[0]
        return grad_x.to(grad.dtype), None, None, None, None
