"""Our int4 codes in the layout of torch's CPU int4 matmul (aten._weight_int4pack_mm_for_cpu).

model.quant stores int4 weights as codes 0..15 (value = (code - 8) * scale), two a byte along
the input dimension, an fp32 scale per group of input columns. torch's CPU kernel ("tinygemm")
dequantizes `code * scale + zero` with the same code offset, from its own interleaved bytes
(aten._convert_weight_to_int4pack_for_cpu) and bf16 (scale, zero) pairs: so our codes repack
exactly, with zero 0 and the scales rounded to bf16. The packed bytes are then the only copy: a
lookup (a tied embedding table) or a float weight reads rows back out of them, in the layout
int4pack_layout() found torch to use on this machine (it differs with the CPU's vector width).
The kernel takes output rows in multiples of ROW_MULTIPLE: a weight with others (GPT-2's
50257-token head) is packed with zero rows after its own, whose outputs matmul() drops.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

KERNEL_GROUP_SIZES = (32, 64, 128, 256)  # the group sizes (qGroupSize) the kernel takes
INNER_K_TILES = 2  # the packer's innerKTiles argument (unused by the CPU layout; K % 32 == 0)
PACK_CHUNK_WEIGHTS = 1 << 18  # weights packed / unpacked at a time (1 MB of int32 codes)
ROW_MULTIPLE = 16  # the kernel's output rows come in blocks of 16
ZERO_CODES = 0x88  # a byte of two codes 8: weight 0 whatever the scale


class Layout(NamedTuple):
    """Where torch's packer puts a weight's rows: blocks of `block` rows, each (K, rows / 2)
    bytes; a full block pairs row r with row r + block / 2 in one byte (`halves`, the AVX2 and
    AVX-512 layouts), a short last block (and every block without `halves`) rows 2i and 2i + 1."""

    block: int
    halves: bool


# AVX-512, AVX2, unvectorized (torch 2.13's aten/src/ATen/native/cpu/int4mm_kernel.cpp);
# int4pack_layout() checks which one torch's packer writes before any is used
LAYOUTS = (Layout(64, True), Layout(32, True), Layout(32, False))


def packable(in_features: int, group_size: int) -> bool:
    """Whether the kernel takes a weight of this width and group size (any rows: padded)."""
    return (
        group_size in KERNEL_GROUP_SIZES and in_features % 32 == 0 and in_features % group_size == 0
    )


def padded_rows(out_features: int) -> int:
    """The rows a weight of out_features rows is packed with: the next multiple of 16."""
    return -(-out_features // ROW_MULTIPLE) * ROW_MULTIPLE


def pack(codes: Tensor, scale: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """(packed (rows, in / 2) uint8, scales_and_zeros (in / group_size, rows, 2) bf16) of our
    int4 codes (out, in / 2) and scales (out, in / group_size, 1), rows = padded_rows(out) (the
    padding: zero weights), a chunk of rows at a time (each block of rows packs on its own, so
    chunks are consecutive rows): small transients, which a load's heap does not keep growing by."""
    out_f, in_f = codes.shape[0], codes.shape[1] * 2
    rows = padded_rows(out_f)
    convert = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    packed = torch.empty(rows, in_f // 2, dtype=torch.uint8, device=codes.device)
    step = _chunk_rows(in_f)
    for r in range(0, rows, step):
        chunk = codes[r : r + step]
        if r + step >= rows > out_f:  # the last chunk: the zero rows after the weight's
            chunk = torch.cat([chunk, chunk.new_full((rows - out_f, chunk.shape[1]), ZERO_CODES)])
        packed[r : r + step] = convert(_nibbles(chunk).to(torch.int32), INNER_K_TILES)
    scales = torch.zeros(in_f // group_size, rows, dtype=scale.dtype, device=scale.device)
    scales[:, :out_f] = scale.reshape(out_f, in_f // group_size).T  # (G, rows)
    scales_and_zeros = torch.stack([scales, torch.zeros_like(scales)], dim=-1)
    return packed, scales_and_zeros.to(torch.bfloat16)


def _nibbles(codes: Tensor) -> Tensor:
    """Our two-a-byte codes (rows, in / 2) as one code a column (rows, in): low nibble first."""
    return torch.stack([codes & 0xF, codes >> 4], dim=-1).reshape(codes.shape[0], -1)


def unpack_codes(packed: Tensor, rows: Tensor, layout: Layout) -> Tensor:
    """Codes 0..15 (len(rows), in) of the given output rows of a packed weight."""
    out_f, in_f = packed.shape[0], packed.shape[1] * 2
    block, r = rows // layout.block, rows % layout.block
    nb = (out_f - block * layout.block).clamp(max=layout.block)  # rows in this row's block
    half = layout.block // 2
    paired = (nb == layout.block) & layout.halves
    byte = torch.where(paired, r % half, r // 2)  # its byte column in each of the K byte rows
    shift = torch.where(paired, r // half, r % 2) * 4
    start = block * layout.block * in_f // 2 + byte  # (R,) the byte of k = 0
    idx = start[:, None] + torch.arange(in_f, device=rows.device) * (nb // 2)[:, None]  # (R, K)
    return (packed.reshape(-1)[idx] >> shift[:, None]) & 0xF


def unpack_block_codes(packed: Tensor, start: int, stop: int, layout: Layout) -> Tensor:
    """Codes 0..15 (stop - start, in) of consecutive rows, from `start` (a multiple of
    layout.block) to `stop` (one too, or the packed rows' end): whole blocks unpacked by
    reshaping their bytes, many times faster than unpack_codes' gather."""
    in_f, flat = packed.shape[1] * 2, packed.reshape(-1)
    full = min(stop, packed.shape[0] // layout.block * layout.block)  # where full blocks end
    n = (full - start) // layout.block
    blocks = flat[start * in_f // 2 : full * in_f // 2].view(n, in_f, layout.block // 2)
    parts = [_block_codes(blocks, layout.halves)]
    if stop > full:  # the short last block: rows 2i and 2i + 1 share a byte
        short = flat[full * in_f // 2 : stop * in_f // 2].view(1, in_f, (stop - full) // 2)
        parts.append(_block_codes(short, False))
    return torch.cat(parts)


def _block_codes(blocks: Tensor, halves: bool) -> Tensor:
    """Codes (n * rows, K) of n blocks' bytes (n, K, rows / 2): a byte holds rows i and i +
    rows / 2 (`halves`) or rows 2i and 2i + 1, the first in its low nibble."""
    low, high = blocks & 0xF, blocks >> 4
    codes = torch.cat([low, high], 2) if halves else torch.stack([low, high], 3).flatten(2)
    return codes.transpose(1, 2).reshape(-1, blocks.shape[1])


def dequantize_rows(
    packed: Tensor, scales_and_zeros: Tensor, group_size: int, rows: Tensor, layout: Layout
) -> Tensor:
    """The float32 weight rows (len(rows), in) of a packed weight: (code - 8) * scale."""
    codes = unpack_codes(packed, rows, layout)
    return _scaled(codes, scales_and_zeros[:, rows], group_size)


def _scaled(codes: Tensor, scales_and_zeros: Tensor, group_size: int) -> Tensor:
    """(code - 8) * scale in float32 of codes (R, in) and their rows' scales_and_zeros (G, R, 2)."""
    rows, in_f = codes.shape
    scale = scales_and_zeros[..., 0].T.float()  # (R, G)
    shape = (rows, scale.shape[1], group_size)  # no -1: R may be 0
    return codes.float().view(shape).sub_(8).mul_(scale[..., None]).view(rows, in_f)


def dequantize(
    packed: Tensor, scales_and_zeros: Tensor, group_size: int, layout: Layout, out_features: int
) -> Tensor:
    """The whole float32 weight (out_features, in) (no padding), a chunk of rows at a time."""
    chunks = dequantize_chunks(packed, scales_and_zeros, group_size, layout, out_features)
    return torch.cat(list(chunks))


def dequantize_chunks(
    packed: Tensor, scales_and_zeros: Tensor, group_size: int, layout: Layout, out_features: int
) -> Iterator[Tensor]:
    """The float32 weight's consecutive chunks of about PACK_CHUNK_WEIGHTS weights (rows, in),
    up to row out_features: a matmul off the kernel (or its backward) never holds a vocab-wide
    head in floats whole. Chunks are whole blocks of rows (unpack_block_codes)."""
    for r, codes in _code_chunks(packed, layout, out_features):
        yield _scaled(codes, scales_and_zeros[:, r : r + len(codes)], group_size)


def unpack(
    packed: Tensor, scales_and_zeros: Tensor, layout: Layout, out_features: int
) -> tuple[Tensor, Tensor]:
    """Inverse of pack: our codes (out_features, in / 2) uint8 and scales (out_features, G, 1)
    float32 (the bf16 values the kernel holds), the padding rows dropped. What a state dict
    holds: the kernel's bytes depend on the CPU (layout), these do not."""
    codes = torch.empty(out_features, packed.shape[1], dtype=torch.uint8, device=packed.device)
    for r, chunk in _code_chunks(packed, layout, out_features):
        codes[r : r + len(chunk)] = chunk[:, 0::2] | (chunk[:, 1::2] << 4)
    scale = scales_and_zeros[:, :out_features, 0].T.float()  # (out, G)
    return codes, scale[..., None].contiguous()


def state_to_ours(state: dict[str, Tensor], prefix: str, out_features: int) -> None:
    """A state dict's packed weight (prefix + int4pack, scales_and_zeros) swapped, in place, for
    our layout's codes and scale (unpack): what state dicts and training checkpoints hold, since
    the kernel's bytes differ with the CPU (Layout), so a checkpoint written on one machine would
    be read wrongly, silently, on another."""
    packed, scales = state.pop(prefix + "int4pack"), state.pop(prefix + "scales_and_zeros")
    codes_and_scale = unpack(packed, scales, int4pack_layout(), out_features)
    state[prefix + "codes"], state[prefix + "scale"] = codes_and_scale


def state_to_kernel(
    state: dict[str, Tensor], prefix: str, shape: tuple[int, int], group_size: int
) -> str | None:
    """Inverse of state_to_ours before a load, in place: prefix + codes and scale, where there,
    packed for this machine's kernel (entries already in its layout pass as they are:
    keep_quantized packs them at load); a message when the codes are not of the (out, in)
    weight's shape."""
    codes_key, scale_key = prefix + "codes", prefix + "scale"
    if codes_key not in state or scale_key not in state:
        return None
    codes, scale = state.pop(codes_key), state.pop(scale_key)
    rows, cols = shape
    want = ((rows, cols // 2), (rows, cols // group_size, 1))
    if (tuple(codes.shape), tuple(scale.shape)) != want:
        return (
            f"size mismatch for {codes_key} / {scale_key}: the checkpoint's are "
            f"{tuple(codes.shape)} / {tuple(scale.shape)}, this int4 weight's {want[0]} / {want[1]}"
        )
    packed = pack(codes.cpu().to(torch.uint8), scale.cpu().float(), group_size)
    state[prefix + "int4pack"], state[prefix + "scales_and_zeros"] = packed
    return None


def _code_chunks(packed: Tensor, layout: Layout, out_features: int) -> Iterator[tuple[int, Tensor]]:
    """(first row, codes 0..15 (rows, in)) of consecutive chunks of about PACK_CHUNK_WEIGHTS
    weights, whole blocks of rows (unpack_block_codes), up to row out_features."""
    step = _chunk_rows(packed.shape[1] * 2)
    for r in range(0, out_features, step):
        stop = min(r + step, packed.shape[0])
        yield r, unpack_block_codes(packed, r, stop, layout)[: out_features - r]


def _chunk_rows(in_features: int) -> int:
    """Rows of about PACK_CHUNK_WEIGHTS weights, a multiple of every layout's block (64)."""
    return max(64, PACK_CHUNK_WEIGHTS // in_features // 64 * 64)


def matmul(
    x: Tensor, packed: Tensor, scales_and_zeros: Tensor, group_size: int, out_features: int
) -> Tensor:
    """x (N, in) bf16 @ the packed weight's transpose: (N, out_features) bf16, torch's CPU
    kernel (the padding rows' outputs dropped)."""
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)
    return y if y.shape[1] == out_features else y[:, :out_features]


@functools.cache
def int4pack_layout() -> Layout | None:
    """The layout torch's CPU int4 packer writes on this machine, or None where torch lacks the
    ops (before 2.6), they fail, the kernel's product is not our dequantized weight exactly, or
    the layout is none of LAYOUTS: then int4 weights stay in our own layout (dequantized per
    forward). A probe of 112 rows (full blocks and a short one) checks all of it once."""
    names = ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu")
    if any(getattr(torch.ops.aten, n, None) is None for n in names):
        return None
    with torch.device("cpu"):  # a first call may come while a model is built on "meta"
        return _probe_layout()


def _probe_layout() -> Layout | None:
    gen = torch.Generator().manual_seed(0)
    out_f, in_f, group_size = 112, 64, 32
    codes = torch.randint(0, 256, (out_f, in_f // 2), dtype=torch.uint8, generator=gen)
    scale = torch.rand(out_f, in_f // group_size, 1, generator=gen) + 0.5
    want = _nibbles(codes)
    try:
        packed, scales_and_zeros = pack(codes, scale, group_size)
        eye = torch.eye(in_f, dtype=torch.bfloat16)  # eye @ W.T: each weight, rounded to bf16
        product = matmul(eye, packed, scales_and_zeros, group_size, out_f).T.float()
    except (RuntimeError, NotImplementedError, TypeError):  # missing kernel, other signature
        return None
    bf16_scale = scale.to(torch.bfloat16).float()
    weight = ((want.float() - 8).view(out_f, -1, group_size) * bf16_scale).view(out_f, in_f)
    if not torch.equal(product, weight.to(torch.bfloat16).float()):
        return None
    rows = torch.arange(out_f)
    return next(
        (lay for lay in LAYOUTS if torch.equal(unpack_codes(packed, rows, lay), want)), None
    )
