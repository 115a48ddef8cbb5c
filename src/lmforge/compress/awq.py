"""AWQ (Lin et al. 2023): scale up the input channels that carry large activations before
rounding to nearest, folding 1/s into whatever produces those channels, so the float model is
unchanged and only the rounding sees the scaled weights.

For each group of Linears sharing an input (q/k/v after the attention norm, gate/up after the
MLP norm in a pre-norm block, the output projection after v when every head has its own v, down after up in a
gated MLP), s = mean|x|^alpha over the calibration tokens, normalised to geometric mean ~1, with
alpha searched on a grid in [0, 1] for the least squared error of the group's outputs after RTN
(alpha = 0 is plain RTN, so the search never does worse on the calibration tokens). The Linears'
input columns are multiplied by s and the producer (norm weight and bias, or the Linear's output
rows and bias) divided by it. Then, as the reference code, each int4 weight's groups are clipped
to the shrink of their range whose rounded outputs are closest (queries and keys left alone);
that step, unlike the scaling, changes the float model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmforge.compress.gptq import Grid, round_nearest
from lmforge.model.moe import MoE


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
    v -> output pair (v's rows feed several heads' columns). In a mixture of experts the MLP
    norm feeds the router and every expert's gate/up, so all of them take its scale (the
    router's columns too, or routing would see the divided norm), and each expert has its own
    up -> down pair. A post-norm block (norm(x + attn(x))) has no norm groups: its norms come
    after the residual add, so they feed no Linear directly and 1/s folded there would change
    the model."""
    attn, mlp = block.attn, block.mlp
    moe = isinstance(mlp, MoE)
    mlps = [(f"mlp.experts.{e}", m) for e, m in enumerate(mlp.experts)] if moe else [("mlp", mlp)]
    norm_fed = (("mlp.router",) if moe else ()) + tuple(f"{prefix}.fc" for prefix, _ in mlps)
    groups = []
    if not block.post_norm:
        groups += [ScaleGroup(("attn.qkv",), "attn_norm"), ScaleGroup(norm_fed, "mlp_norm")]
    if attn.n_kv_head == attn.n_head:
        v_start = (attn.n_head + attn.n_kv_head) * attn.head_dim
        groups.append(ScaleGroup(("attn.proj",), "attn.qkv", slice(v_start, None)))
    for prefix, m in mlps:
        if m.swiglu:
            hidden = m.proj.in_features
            groups.append(
                ScaleGroup((f"{prefix}.proj",), f"{prefix}.fc", slice(hidden, 2 * hidden))
            )
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
    x: Tensor, weights: list[Tensor], grids: list[Grid | None], n_grid: int = 20
) -> tuple[Tensor, float]:
    """(s, alpha) minimising sum ||x W^T - x (RTN(W s) / s)^T||^2 over the weights sharing the
    input x (N, in) that are rounded (grid None: kept float, no error), alpha in {0, 1/n_grid,
    ..., 1}."""
    x = x.float()
    x_mean = x.abs().mean(dim=0)  # (in,)
    refs = [x @ w.T for w in weights]

    def loss(s: Tensor) -> float:
        pairs = zip(weights, grids, refs, strict=True)
        return sum((x @ (round_nearest(w * s, g) / s).T - ref).pow(2).mean().item()
                   for w, g, ref in pairs if g is not None)  # fmt: skip

    tried = ((i / n_grid, candidate_scales(x_mean, i / n_grid)) for i in range(n_grid + 1))
    _, alpha, s = min(((loss(s), alpha, s) for alpha, s in tried), key=lambda t: t[0])
    return s, alpha


@torch.no_grad()
def clip_weight(
    w: Tensor, x: Tensor, grid: Grid, n_grid: int = 20, max_shrink: float = 0.5,
    n_tokens: int = 512, row_batch: int = 64,
) -> Tensor:  # fmt: skip
    """w (out, in) with each (row, group)'s range clamped to the shrink of its absmax (1, 1 -
    1/n_grid, ... down to 1 - max_shrink) whose RTN output on x (N, in; n_tokens of them,
    evenly spaced) is closest to w's: the reference code's clipping search. RTN then takes
    its scale from the clamped range."""
    out_f, in_f = w.shape
    g = grid.group_size
    x = x[:: max(1, x.shape[0] // n_tokens)][:n_tokens].float()
    xg = x.reshape(1, x.shape[0], in_f // g, g)  # (1, n, G, g)
    clipped = w.detach().float().clone()
    for r in range(0, out_f, row_batch):
        wb = clipped[r : r + row_batch].reshape(-1, 1, in_f // g, g)  # (b, 1, G, g)
        top = wb.abs().amax(dim=-1, keepdim=True)  # (b, 1, G, 1)
        ref = (xg * wb).sum(dim=-1)  # (b, n, G)
        best_err, best_top = torch.full_like(top, float("inf")), top.clone()
        for i in range(int(max_shrink * n_grid)):
            cap = top * (1 - i / n_grid)
            q = round_nearest(torch.clamp(wb, -cap, cap).reshape(-1, in_f), grid)
            err = ((xg * q.reshape(wb.shape)).sum(dim=-1) - ref).pow(2).mean(dim=1)
            better = err.reshape(top.shape) < best_err
            best_err = torch.where(better, err.reshape(top.shape), best_err)
            best_top = torch.where(better, cap, best_top)
        clipped[r : r + row_batch] = torch.clamp(wb, -best_top, best_top).reshape(-1, in_f)
    return clipped


def clipped_rows(block: nn.Module, name: str) -> slice | None:
    """Rows of a Linear the clipping search may clamp: not the queries' and keys' (attention
    scores are sensitive to them, so the reference code leaves q/k unclipped), nor an MoE
    router's (None: a clamped router row would move routing itself)."""
    if name == "mlp.router":
        return None
    if name != "attn.qkv":
        return slice(None)
    attn = block.attn
    return slice((attn.n_head + attn.n_kv_head) * attn.head_dim, None)


def awq_block(
    block: nn.Module, inputs: dict[str, Tensor], grid: Callable[[str], Grid | None], n_grid: int
) -> dict[str, float]:
    """Search and fold the scales of every group of block, then clip its int4 weights; inputs:
    each Linear's calibration inputs (N, in) by name (divided by the folded scales here, as
    the scaled weights see them; an MoE expert no token reached has none, and keeps RTN),
    grid(name) the RTN grid of that Linear. The first consumer's inputs score a group's scales
    (an MoE norm group's: the router's, every token). Returns alpha per group."""
    alphas = {}
    for group in scale_groups(block):
        if group.consumers[0] not in inputs:  # an MoE expert no calibration token reached
            continue
        weights = [block.get_submodule(n).weight.detach().float() for n in group.consumers]
        s, alpha = search_scale(
            inputs[group.consumers[0]], weights, [grid(n) for n in group.consumers], n_grid
        )
        fold_scales(block, group, s)
        for name in set(group.consumers) & set(inputs):
            inputs[name] = inputs[name] / s
        alphas[f"{group.producer}->{','.join(group.consumers)}"] = alpha
    for name, x in inputs.items():
        rows = clipped_rows(block, name)
        if rows is not None and grid(name).axis == "group":
            linear = block.get_submodule(name)
            with torch.no_grad():
                linear.weight[rows] = clip_weight(linear.weight[rows], x, grid(name), n_grid)
    return alphas
