"""Weight-only int8/int4 quantization: of a frozen nn.Linear (QLoRA) and of a whole checkpoint.

QuantLinear keeps a frozen weight as int8 (one scale per output row) or 4-bit (one scale per
group of `group_size` input columns, two values packed per byte), so it takes 1/4 or, with
groups of 32 and their fp32 scales (5 bits a weight), 1/6.4 of its fp32 memory. int8 inference
on CPU runs torch's int8 weight-only matmul (aten._weight_int8pack_mm, bf16 activations);
otherwise (int4, grad enabled, GPU, a torch without the kernel) the weight is dequantized on
every forward. QLoRA trains LoRA adapters on top in full precision. Symmetric absmax rounding:
small, readable, no custom kernels.

quantize_tensors() applies the same rounding to every matrix of a checkpoint (`lmforge compress
quantize`): model.safetensors then holds the codes under each weight's own name plus
`<name>_scale`, and config.json's `quantization_config` (quant_method "lmforge") says which
tensors are quantized with how many bits. load_pretrained() keeps them quantized by default
(read_quantized -> QuantWeight -> keep_quantized: QuantLinear / QuantEmbedding built from the
stored codes, never an fp32 matrix) or dequantizes them for training (dequantize_tensors).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
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
        op(
            torch.ones(1, 16, dtype=bf16),
            torch.ones(4, 16, dtype=torch.int8),
            torch.ones(4, dtype=bf16),
        )
    except (RuntimeError, NotImplementedError):
        return False
    return True


# torch's CPU int8 kernel is vectorized for bf16/fp16 activations only: with fp32 ones it runs
# ~10x slower than fp32 F.linear (torch 2.13, measured), so fp32 activations go in as bf16.
KERNEL_DTYPE = {torch.float32: torch.bfloat16, torch.bfloat16: torch.bfloat16,
                torch.float16: torch.float16}  # fmt: skip


INT4_CHUNK_WEIGHTS = 1 << 22  # an int4 matmul dequantizes 4M weights (16 MB in fp32) at a time


def _aligned(t: Tensor) -> Tensor:
    """t in memory that starts on a 64-byte boundary: torch's int8 kernel crashes (SIGSEGV)
    on operands that do not (a view, a tensor inside a safetensors buffer)."""
    return t if t.data_ptr() % 64 == 0 else t.clone()


def _uses_int8_kernel(x: Tensor, layer: QuantLinear) -> bool:
    """The int8 kernel serves inference (no_grad / inference_mode) on CPU; with grad enabled
    (QLoRA training) the weight is dequantized, so the frozen base computes in the input's dtype
    even where the input needs no gradient (the first block's, below every adapter). The kernel
    also crashes unless in_features is a multiple of 16 (torch 2.13, measured)."""
    return (
        layer.bits == 8
        and not (torch.compiler.is_compiling() or torch.compiler.is_exporting())  # no data_ptr
        and layer.in_features % 16 == 0
        and layer.codes.data_ptr() % 64 == 0
        and x.device.type == "cpu"
        and x.dtype in KERNEL_DTYPE
        and not torch.is_grad_enabled()
        and int8_kernel_available()
    )


class QuantLinear(nn.Module):
    """A frozen Linear whose weight lives as int8/int4 codes; computes in the input's dtype.

    `transposed` marks a weight its checkpoint stores as (in, out) (GPT-2's Conv1D). int8 codes
    are (out, in) with a scale per output row (out, 1), or per input column (1, in) when
    transposed; inference on CPU runs torch's int8 weight-only matmul where torch has it, with
    activations in bf16 (KERNEL_DTYPE: the rest of an fp32 model stays fp32). int4
    codes stay packed ((out, in / 2), or (in, out / 2) when transposed) and are dequantized on
    each forward.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int = 32,
        bias: bool = False,
        transposed: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.transposed = bits, group_size, transposed
        rows, cols = (in_features, out_features) if transposed else (out_features, in_features)
        if bits == 8:  # codes always (out, in): a transposed checkpoint's are transposed on load
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
        """linear's weight quantized (the QLoRA base)."""
        if kind not in BITS:
            raise ConfigError(f"unknown quantization {kind!r}; valid: {', '.join(BITS)}")
        q = cls(linear.in_features, linear.out_features, BITS[kind], group_size)
        q.codes, q.scale = quantize_weight(linear.weight.detach().float(), q.bits, group_size)
        q.bias = linear.bias.detach().clone() if linear.bias is not None else None
        return q

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (out, in); recomputed on each access."""
        w = dequantize_weight(self.codes, self.scale, self.bits, self.group_size)
        return w.T if self.transposed and self.bits == 4 else w

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
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


class QuantEmbedding(nn.Module):
    """An embedding table kept as int8/int4 codes (a scale per row or per group of columns):
    a lookup dequantizes only the rows it gathers."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.bits, self.group_size = bits, group_size
        if bits == 8:
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
        return dequantize_weight(self.codes, self.scale, self.bits, self.group_size)

    def forward(self, idx: Tensor) -> Tensor:
        flat = idx.reshape(-1)
        rows = dequantize_weight(self.codes[flat], self.scale[flat], self.bits, self.group_size)
        return rows.reshape(*idx.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}"


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
    packed = read_quantized(tensors, config, where)
    return {k: v.dequantize() if isinstance(v, QuantWeight) else v for k, v in packed.items()}


def quantized_numel(model: nn.Module) -> int:
    """How many weights the model holds as codes (a table shared by two modules counts once):
    what parameter counts add, since codes are buffers."""
    kept = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
    return sum({id(m.codes): m.codes.numel() * (8 // m.bits) for m in kept}.values())


@dataclass(frozen=True)
class QuantWeight:
    """One quantized matrix of a checkpoint on its way into a model, in our (out, in) layout
    unless `transposed` (int4 codes of a weight the checkpoint stores as (in, out))."""

    codes: Tensor
    scale: Tensor
    bits: int
    group_size: int
    transposed: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        """The (out, in) shape of the weight the codes stand for."""
        rows = self.codes.shape[0]
        cols = self.codes.shape[1] * (2 if self.bits == 4 else 1)
        return (cols, rows) if self.transposed and self.bits == 4 else (rows, cols)

    def dequantize(self) -> Tensor:
        w = dequantize_weight(self.codes, self.scale.float(), self.bits, self.group_size)
        return w.T.contiguous() if self.transposed and self.bits == 4 else w

    def to(self, device: torch.device | str, dtype: torch.dtype) -> QuantWeight:
        """Codes moved as they are; the scale in the model's dtype."""
        return replace(self, codes=self.codes.to(device), scale=self.scale.to(device, dtype))

    def fused(self, rest: list[QuantWeight], transpose: bool) -> QuantWeight | None:
        """self and rest as one weight, the checkpoint's parts transposed and/or concatenated
        along the output rows like an unquantized weight; None if they cannot stay quantized."""
        parts = [self, *rest]
        if any(
            (p.bits, p.group_size, p.transposed) != (self.bits, self.group_size, False)
            for p in parts
        ):
            return None
        if transpose and len(parts) > 1:
            return None
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

    Every tensor is copied into memory of its own: safetensors' load_file hands out views into
    the file's mapping (which one kept view keeps whole, and at offsets the int8 kernel cannot
    take); a copy starts on a 64-byte boundary and the mapping is released once loaded.
    """
    _check_method(config, where)
    out: dict[str, Tensor | QuantWeight] = {name: t.clone() for name, t in tensors.items()}
    for name, bits in config["bits"].items():
        scale = out.pop(name + SCALE_SUFFIX, None)
        if name not in out or scale is None:
            raise InputError(f"{where}: quantized tensor {name} or its scale is missing")
        out[name] = QuantWeight(out[name], scale, int(bits), config["group_size"])
    return out


def keep_quantized(model: nn.Module, state: dict[str, Any]) -> dict[str, Tensor]:
    """Swap each nn.Linear / nn.Embedding whose weight is a QuantWeight in state for a
    QuantLinear / QuantEmbedding (empty, on model's device: call under torch.device("meta"));
    returns state with their codes/scale under the new modules' names, the rest dequantized.

    A weight whose module is missing or of another shape (a config.json that is not the
    checkpoint's) is dequantized too, so load_state_dict refuses it as it refuses floats."""
    out: dict[str, Tensor] = {}
    for name, value in state.items():
        if not isinstance(value, QuantWeight):
            out[name] = value
            continue
        path = name.removesuffix(".weight")
        module = _submodule(model, path) if name.endswith(".weight") else None
        swapped = _quant_module(module, value)
        if swapped is None:  # not a plain Linear/Embedding weight: the module gets floats
            out[name] = value.dequantize().to(value.scale.dtype)
            continue
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, swapped)
        out[f"{path}.codes"], out[f"{path}.scale"] = value.codes, value.scale
    return out


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:  # an unexpected name: load_state_dict names it
        return None


def _quant_module(module: nn.Module | None, w: QuantWeight) -> nn.Module | None:
    if type(module) not in (nn.Linear, nn.Embedding) or tuple(module.weight.shape) != w.shape:
        return None
    if type(module) is nn.Linear:
        bias = module.bias is not None
        return QuantLinear(*reversed(w.shape), w.bits, w.group_size, bias, w.transposed)
    if type(module) is nn.Embedding and not w.transposed:
        return QuantEmbedding(*w.shape, w.bits, w.group_size)
    return None


def _check_method(config: dict[str, Any], where: object) -> None:
    if config.get("quant_method") != QUANT_METHOD:
        raise InputError(
            f"{where}: quantization_config.quant_method {config.get('quant_method')!r} is not "
            f"supported; lmforge reads its own ('{QUANT_METHOD}') or unquantized checkpoints"
        )
