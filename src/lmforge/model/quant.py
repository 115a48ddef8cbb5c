"""Weight-only int8/int4 quantization of a frozen nn.Linear (QLoRA, kept-quantized checkpoints).

QuantLinear keeps a frozen weight as int8 (one scale per output row) or 4-bit (one scale per
group of `group_size` input columns, two values packed per byte), so it takes 1/4 or, with
groups of 32 and their fp32 scales (5 bits a weight), 1/6.4 of its fp32 memory. Inference on
CPU runs torch's weight-only matmuls with bf16 activations: int8's aten._weight_int8pack_mm,
and int4's aten._weight_int4pack_mm_for_cpu on weights packed into its layout (model.int4pack:
a checkpoint's at load, QLoRA's base when quantized); int4's also with grad enabled (QLoRA
training: its backward reads the frozen weight back for the input's gradient, a chunk of rows at
a time). Otherwise (int8 with grad enabled, GPU, a torch without the kernel, a group size it
lacks) the weight is dequantized on every forward. QLoRA trains LoRA adapters on top in full
precision. Symmetric absmax rounding: small, readable, no custom kernels.

A whole checkpoint's quantization (`lmforge compress quantize`) and how it loads is
model.quant_checkpoint.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import ConfigError
from lmforge.model import int4pack

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
    out_f, in_f = codes.shape[0], codes.shape[1] * 2
    q = torch.empty(out_f, in_f // 2, 2, dtype=scale.dtype, device=codes.device)
    q[..., 0], q[..., 1] = codes & 0xF, codes >> 4  # one float buffer, filled in place
    groups = q.view(out_f, in_f // group_size, group_size).sub_(8).mul_(scale)
    return groups.view(out_f, in_f)


@functools.cache
def int8_kernel_available() -> bool:
    """Whether torch has the CPU int8 weight-only matmul (aten._weight_int8pack_mm) and it runs."""
    op = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
    if op is None:
        return False
    try:
        bf16 = torch.bfloat16  # the probe is shaped like every real call (see _uses_int8_kernel)
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


INT4_CHUNK_WEIGHTS = 1 << 22  # an int4 matmul dequantizes 4M weights (16 MB in fp32) at a time


def _aligned(t: Tensor) -> Tensor:
    """t in memory that starts on a 64-byte boundary: torch's int8 kernel crashes (SIGSEGV)
    on operands that do not (a view, a tensor inside a safetensors buffer)."""
    return t if t.data_ptr() % 64 == 0 else t.clone()


def _tracing() -> bool:
    """Under torch.compile or torch.export. torch.compiler.is_exporting is newer than the
    torch>=2.6 we take (pytorch#142425, December 2024), and is_compiling covers export too."""
    exporting = getattr(torch.compiler, "is_exporting", None)
    return torch.compiler.is_compiling() or (exporting is not None and exporting())


def _cpu_kernel_input(x: Tensor) -> bool:
    """Whether x can go through a CPU kernel: on CPU, outside torch.compile/export (no
    data_ptr), in a float dtype KERNEL_DTYPE takes."""
    return not _tracing() and x.device.type == "cpu" and x.dtype in KERNEL_DTYPE


def _inference_on_cpu(x: Tensor) -> bool:
    """Whether x goes through a CPU kernel that has no backward: inference only."""
    return _cpu_kernel_input(x) and not torch.is_grad_enabled()


def _uses_int8_kernel(x: Tensor, layer: QuantLinear) -> bool:
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


class _Int4KernelLinear(torch.autograd.Function):
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


class _StateInOurLayout(nn.Module):
    """State dicts of a kernel-packed int4 weight in our layout, packed at load for this
    machine's kernel (int4pack.state_to_ours): checkpoints that load on any CPU."""

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.kernel_packed:
            int4pack.state_to_ours(destination, prefix, _weight_shape(self)[0])

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        if self.kernel_packed:
            error = int4pack.state_to_kernel(
                state_dict, prefix, _weight_shape(self), self.group_size
            )
            error_msgs += [error] if error else []
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class QuantLinear(_StateInOurLayout):
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
        rows, cols = (in_features, out_features) if transposed else (out_features, in_features)
        if kernel_packed:
            _register_kernel_buffers(self, out_features, in_features, group_size)
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
            return _kernel_packed_rows(self, None)
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
        if not _uses_int8_kernel(x, self):
            return F.linear(x, self.weight.to(x.dtype), bias)
        dtype = KERNEL_DTYPE[x.dtype]
        flat = x.reshape(-1, self.in_features)  # (N, in)
        scale = self.scale.reshape(-1)
        if self.scale.shape[0] == 1:  # per input column: scale x, then plain int8 codes
            flat, scale = flat * scale.to(x.dtype), torch.ones(self.out_features)
        y = torch.ops.aten._weight_int8pack_mm(
            _aligned(flat.to(dtype).contiguous()), self.codes, _aligned(scale.to(dtype))
        )  # (N, out)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias

    def _kernel_int4_forward(self, x: Tensor) -> Tensor:
        """x @ weight.T through torch's int4 kernel (bf16 activations; with grad enabled too:
        _Int4KernelLinear); off the kernel's ground (another device, torch.compile) through the
        weight read back from its layout."""
        if not _cpu_kernel_input(x):  # chunks of output rows, like _int4_forward's
            chunks = int4pack.dequantize_chunks(*_kernel_args(self), self.layout, self.out_features)
            return torch.cat([F.linear(x, w.to(x.dtype)) for w in chunks], dim=-1)
        flat = x.reshape(-1, self.in_features)  # (N, in)
        y = _Int4KernelLinear.apply(flat, *_kernel_args(self), self.out_features)
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

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        return _apply_keeping_kernel_scales(self, fn, super()._apply, recurse)


class QuantEmbedding(_StateInOurLayout):
    """An embedding table kept as int8/int4 codes (a scale per row or per group of columns):
    a lookup dequantizes only the rows it gathers. `kernel_packed`: int4 held in torch's int4
    kernel layout like QuantLinear's (a table tied to the LM head shares the head's bytes);
    rows come out in `dtype` (the model's), as they would from our own layout's scales."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        bits: int,
        group_size: int,
        kernel_packed: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.bits, self.group_size, self.kernel_packed = bits, group_size, kernel_packed
        self.dtype = dtype
        if kernel_packed:
            _register_kernel_buffers(self, num_embeddings, embedding_dim, group_size)
        elif bits == 8:
            self.register_buffer(
                "codes", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8)
            )
            self.register_buffer("scale", torch.empty(num_embeddings, 1))
        else:
            packed = (num_embeddings, embedding_dim // 2)
            self.register_buffer("codes", torch.empty(packed, dtype=torch.uint8))
            self.register_buffer(
                "scale", torch.empty(num_embeddings, embedding_dim // group_size, 1)
            )

    @property
    def weight(self) -> Tensor:
        """The whole dequantized table (num_embeddings, embedding_dim)."""
        if self.kernel_packed:
            return _kernel_packed_rows(self, None).to(self.dtype)
        return dequantize_weight(self.codes, self.scale, self.bits, self.group_size)

    def forward(self, idx: Tensor) -> Tensor:
        flat = idx.reshape(-1)
        if self.kernel_packed:
            rows = _kernel_packed_rows(self, flat).to(self.dtype)
        else:
            rows = dequantize_weight(self.codes[flat], self.scale[flat], self.bits, self.group_size)
        return rows.reshape(*idx.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}"

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype  # rows follow model.to(dtype)
        return _apply_keeping_kernel_scales(self, fn, super()._apply, recurse)


def _register_kernel_buffers(module: nn.Module, rows: int, cols: int, group_size: int) -> None:
    """An int4 (rows, cols) weight's buffers in torch's int4 kernel layout (model.int4pack),
    its rows padded to the kernel's multiple, and that layout (`layout`), read here rather than
    in forward: under torch.compile int4pack_layout's cache and device context would break the
    graph at every such layer."""
    module.layout = int4pack.int4pack_layout()
    rows = int4pack.padded_rows(rows)
    module.register_buffer("int4pack", torch.empty(rows, cols // 2, dtype=torch.uint8))
    groups = torch.empty(cols // group_size, rows, 2, dtype=torch.bfloat16)
    module.register_buffer("scales_and_zeros", groups)


def _apply_keeping_kernel_scales(
    module: QuantLinear | QuantEmbedding,
    fn: Callable[[Tensor], Tensor],
    apply: Callable[..., nn.Module],
    recurse: bool,
) -> nn.Module:
    """nn.Module._apply (model.to(dtype), .float(), .half(), .cuda()) with a kernel-packed
    weight's scales_and_zeros kept as they are, bf16: the kernel takes no other dtype (torch
    2.13: "expected scalar type BFloat16"), bf16 -> fp16 would lose range, and a tied pair
    keeps sharing them."""
    if not module.kernel_packed:
        return apply(fn, recurse)
    scales = module.scales_and_zeros
    apply(fn, recurse)
    module.scales_and_zeros = scales.to(module.int4pack.device)
    return module


def _kernel_args(module: QuantLinear | QuantEmbedding) -> tuple[Tensor, Tensor, int]:
    return module.int4pack, module.scales_and_zeros, module.group_size


def _weight_shape(module: QuantLinear | QuantEmbedding) -> tuple[int, int]:
    """The (rows, columns) of the weight a quantized module stands for (no kernel padding)."""
    if isinstance(module, QuantLinear):
        return module.out_features, module.in_features
    return module.num_embeddings, module.embedding_dim


def _kernel_packed_rows(module: QuantLinear | QuantEmbedding, rows: Tensor | None) -> Tensor:
    """Float32 rows (all of them for None) of a kernel-packed weight, read back from its bytes."""
    n_rows = _weight_shape(module)[0]
    if rows is None:
        return int4pack.dequantize(*_kernel_args(module), module.layout, n_rows)
    packed, scales_and_zeros, group_size = _kernel_args(module)
    # the padding rows' scales out of reach: an id past the table raises, as nn.Embedding's
    return int4pack.dequantize_rows(
        packed, scales_and_zeros[:, :n_rows], group_size, rows, module.layout
    )


def _stored_codes(module: QuantLinear | QuantEmbedding) -> Tensor:
    """The tensor holding a quantized module's codes, in whichever layout it keeps them."""
    return module.int4pack if module.kernel_packed else module.codes


def quantized_numel(model: nn.Module) -> int:
    """How many weights the model holds as codes (a table shared by two modules counts once;
    the kernel layout's padding rows do not count): what parameter counts add, since codes are
    buffers."""
    kept = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
    return sum({id(_stored_codes(m)): math.prod(_weight_shape(m)) for m in kept}.values())
