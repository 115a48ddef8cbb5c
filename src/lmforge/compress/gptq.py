"""GPTQ (Frantar et al. 2022): round a Linear's weight column by column, each column's rounding
error spread over the columns not yet rounded through the inverse Hessian of its inputs.

Pure math on one matrix: gptq_weight(W, H, grid) returns the rounded weight and its scales, both
(out, in), on our RTN grid (model.quant_rounding: symmetric codes, int8 a scale per output row or,
for a checkpoint that stores the weight transposed, per input column; int4 a scale per group of
input columns), so the checkpoint layout, loading and every consumer stay as they are. With
H = I no error is spread and the result is RTN's, code for code.

As the reference code: H is dampened by `damp` x its mean diagonal, dead inputs (H_ii = 0)
get H_ii = 1 and a zero weight column, columns are processed in lazy blocks with the upper
Cholesky factor of H^-1. Group scales are taken from the group's current (error-updated) columns
when it is reached; with act_order (columns in descending H_ii order) they are computed from
the original weight first ("static groups"), so the groups stay contiguous input columns and no
permutation (g_idx) needs storing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lmforge.errors import ConfigError
from lmforge.model.quant_rounding import absmax_scale, code_range

ScaleAxis = Literal["row", "group", "column"]


@dataclass(frozen=True)
class Grid:
    """What one matrix is rounded to: bits, and where its scales lie (per output row, per group
    of `group_size` input columns, or per input column)."""

    bits: int
    axis: ScaleAxis
    group_size: int = 0


def block_width(grid: Grid, columns: int = 128) -> int:
    """Lazy-batch width: `columns` rounded up to whole groups, so a group's scale is computed
    from columns that carry every earlier column's update."""
    if grid.axis != "group":
        return columns
    return -(-columns // grid.group_size) * grid.group_size


def static_scales(w: Tensor, grid: Grid) -> Tensor:
    """(out, in) scales of w computed up front, as RTN computes them."""
    out_f, in_f = w.shape
    if grid.axis == "row":
        return absmax_scale(w, grid.bits).expand(out_f, in_f).clone()
    if grid.axis == "column":
        return absmax_scale(w.T, grid.bits).T.expand(out_f, in_f).clone()
    groups = w.reshape(out_f, in_f // grid.group_size, grid.group_size)
    return absmax_scale(groups, grid.bits).expand_as(groups).reshape(out_f, in_f).clone()


def round_to_grid(w: Tensor, scale: Tensor, bits: int) -> Tensor:
    """w rounded to the nearest representable value code * scale."""
    lo, hi = code_range(bits)
    return torch.round(w / scale).clamp(lo, hi) * scale


def rtn_weight(w: Tensor, grid: Grid) -> tuple[Tensor, Tensor]:
    """(rounded weight, scales) of RTN, gptq_weight's layout: what it gives for H = I, without
    the column loop (for a Linear with no calibration inputs, e.g. an MoE expert no token
    reached)."""
    w = w.detach().float()
    scales = static_scales(w, grid)
    return round_to_grid(w, scales, grid.bits), scales


def round_nearest(w: Tensor, grid: Grid) -> Tensor:
    """RTN of w on grid (float32)."""
    return rtn_weight(w, grid)[0]


def inverse_hessian_factor(h: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1."""
    h = h.clone()
    idx = torch.arange(h.shape[0])
    h[idx, idx] += damp * torch.mean(torch.diag(h))
    try:
        lower = torch.linalg.cholesky(h)
    except torch.linalg.LinAlgError:
        raise ConfigError(
            f"GPTQ: the input Hessian is not positive definite at damp_percent={damp}; "
            "raise quantize.damp_percent (e.g. 0.1) or give more calibration tokens"
        ) from None
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def gptq_weight(
    w: Tensor, h: Tensor, grid: Grid, damp: float = 0.01, act_order: bool = False
) -> tuple[Tensor, Tensor]:
    """(rounded weight, scales), both (out, in) float32: w (out, in) rounded on `grid` to
    minimise ||X w^T - X q^T|| for inputs whose H = 2 X^T X / n is h (in, in)."""
    w, h = w.detach().float().clone(), h.float().clone()
    n = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    scales = static_scales(w, grid) if grid.axis == "row" or act_order else torch.zeros_like(w)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(n)
    w, h, scales = w[:, perm], h[perm][:, perm], scales[:, perm]
    hinv = inverse_hessian_factor(h, damp)
    q = torch.zeros_like(w)
    width = block_width(grid)
    for i1 in range(0, n, width):
        i2 = min(i1 + width, n)
        w1, err1 = w[:, i1:i2].clone(), torch.zeros_like(w[:, i1:i2])
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            if grid.axis == "column":
                scales[:, i1 + i] = absmax_scale(col, grid.bits)
            elif grid.axis == "group" and not act_order and (i1 + i) % grid.group_size == 0:
                group = w1[:, i : i + grid.group_size]
                scales[:, i1 + i : i1 + i + grid.group_size] = absmax_scale(group, grid.bits)
            q[:, i1 + i] = round_to_grid(col, scales[:, i1 + i], grid.bits)
            err = (col - q[:, i1 + i]) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    return q[:, inv], scales[:, inv]
