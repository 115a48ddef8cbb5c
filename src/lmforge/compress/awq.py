"""AWQ (Lin et al. 2023): scale up the input channels that carry large activations before
rounding to nearest, folding 1/s into whatever produces those channels, so the float model is
unchanged and only the rounding sees the scaled weights.

For each group of Linears sharing an input (q/k/v after the attention norm, gate/up after the
MLP norm, the output projection after v when every head has its own v, down after up in a
gated MLP), s = mean|x|^alpha over the calibration tokens, normalised to geometric mean ~1, with
alpha searched on a grid in [0, 1] for the least squared error of the group's outputs after RTN
(alpha = 0 is plain RTN, so the search never does worse on the calibration tokens). The Linears'
input columns are multiplied by s and the producer (norm weight and bias, or the Linear's output
rows and bias) divided by it. The weight clipping search of the reference code is not done.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmforge.compress.gptq import Grid, round_nearest


@dataclass(frozen=True)
class ScaleGroup:
    """Linears (by their name in the block) whose shared input channels come from `producer`:
    a norm, or the output rows `rows` of a Linear."""

    consumers: tuple[str, ...]
    producer: str
    rows: slice | None = None


def scale_groups(block: nn.Module) -> list[ScaleGroup]:
    """The block's groups, as the reference code pairs them for Llama-style blocks; a GELU MLP
    has no up -> down pair (GELU does not commute with a scale), grouped-query attention no
    v -> output pair (v's rows feed several heads' columns)."""
    attn, mlp = block.attn, block.mlp
    groups = [ScaleGroup(("attn.qkv",), "attn_norm"), ScaleGroup(("mlp.fc",), "mlp_norm")]
    if attn.n_kv_head == attn.n_head:
        v_start = (attn.n_head + attn.n_kv_head) * attn.head_dim
        groups.append(ScaleGroup(("attn.proj",), "attn.qkv", slice(v_start, None)))
    if mlp.swiglu:
        hidden = mlp.proj.in_features
        groups.append(ScaleGroup(("mlp.proj",), "mlp.fc", slice(hidden, 2 * hidden)))
    return groups


@torch.no_grad()
def fold_scales(block: nn.Module, group: ScaleGroup, s: Tensor) -> None:
    """Multiply the consumers' input columns by s and divide the producer's outputs by s: the
    block computes the same function."""
    producer = block.get_submodule(group.producer)
    rows = group.rows if group.rows is not None else slice(None)
    scale = s if group.rows is None else s[:, None]  # a norm's vector, or a Linear's rows
    producer.weight[rows] /= scale
    if getattr(producer, "bias", None) is not None:
        producer.bias[rows] /= s
    for name in group.consumers:
        block.get_submodule(name).weight.mul_(s[None, :])


def candidate_scales(x_mean: Tensor, alpha: float) -> Tensor:
    """mean|x|^alpha per input channel, normalised so max * min = 1 (the reference code's)."""
    s = x_mean.pow(alpha).clamp_min(1e-4)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def search_scale(
    x: Tensor, weights: list[Tensor], grids: list[Grid], n_grid: int = 20
) -> tuple[Tensor, float]:
    """(s, alpha) minimising sum ||x W^T - x (RTN(W s) / s)^T||^2 over the weights sharing the
    input x (N, in), alpha in {0, 1/n_grid, ..., 1}."""
    x = x.float()
    x_mean = x.abs().mean(dim=0)  # (in,)
    refs = [x @ w.T for w in weights]

    def loss(s: Tensor) -> float:
        pairs = zip(weights, grids, refs, strict=True)
        return sum((x @ (round_nearest(w * s, g) / s).T - ref).pow(2).mean().item()
                   for w, g, ref in pairs)  # fmt: skip

    tried = ((i / n_grid, candidate_scales(x_mean, i / n_grid)) for i in range(n_grid + 1))
    _, alpha, s = min(((loss(s), alpha, s) for alpha, s in tried), key=lambda t: t[0])
    return s, alpha


def awq_block(
    block: nn.Module, inputs: dict[str, Tensor], grid: Callable[[str], Grid], n_grid: int
) -> dict[str, float]:
    """Search and fold the scales of every group of block; inputs: each Linear's calibration
    inputs (N, in) by name, grid(name) the RTN grid of that Linear. Returns alpha per group."""
    alphas = {}
    for group in scale_groups(block):
        weights = [block.get_submodule(n).weight.detach().float() for n in group.consumers]
        s, alpha = search_scale(
            inputs[group.consumers[0]], weights, [grid(n) for n in group.consumers], n_grid
        )
        fold_scales(block, group, s)
        alphas[f"{group.producer}->{','.join(group.consumers)}"] = alpha
    return alphas
