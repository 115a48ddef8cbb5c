"""Calibrated rounding of a checkpoint: GPTQ on every Linear of a decoder's blocks, written as
the same codes and scales RTN writes (model.quant_checkpoint), so nothing downstream changes;
or AWQ's scales folded and its clipping applied into the blocks' float tensors, which RTN then
rounds.

The float model is rounded block by block in place (compress.calibration's BlockInputs: each
block sees the outputs of the blocks already rounded); each rounded weight and its (out, in)
scales are then mapped to the checkpoint's tensors through the family's name table (split,
transposed as the checkpoint stores them: hf_families.rules.ours_to_hf), and the codes are the
rounded weight encoded at those scales. Each Linear is rounded on the grid RTN chose for its
checkpoint tensor (bits; a transposed int8 tensor's scale per input column), so the two agree
on layout by construction; a scale that is not constant within its group is an internal error.
Matrices outside the blocks (embeddings, the LM head) keep RTN; MoE routers stay float (their
quantization_config lists them under modules_to_not_convert), so neither method rounds them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.compress.awq import awq_block
from lmforge.compress.calibration import BlockInputs, block_linears, hessians, linear_inputs_of
from lmforge.compress.gptq import Grid, gptq_weight, rtn_weight
from lmforge.errors import ConfigError
from lmforge.model.convert.hf_import import NATIVE, hf_config_to_model_config
from lmforge.model.hf_families import FAMILIES
from lmforge.model.hf_families.rules import Rule, ours_to_hf
from lmforge.model.quant_checkpoint import SCALE_SUFFIX
from lmforge.model.quant_rounding import encode_weight

log = logging.getLogger(__name__)


def checkpoint_rules(hf: dict[str, Any], keys: set[str]) -> dict[str, Rule]:
    """Our weight name -> the name-table rule to its checkpoint tensors (their names as this
    checkpoint spells them), for a native or HF-family checkpoint."""
    if hf.get("model_type") == NATIVE:
        return {k: Rule(k, (k,)) for k in keys}
    family = FAMILIES[hf["model_type"]]

    def stored(name: str) -> str:  # some checkpoints omit the family prefix (model.convert)
        bare = name.removeprefix(family.prefix)
        return bare if name not in keys and bare in keys else name

    rules = family.rules(hf_config_to_model_config(hf))
    return {r.ours: replace(r, hf_names=tuple(stored(n) for n in r.hf_names)) for r in rules}


def grid_for(name: str, link: Rule, quant: dict[str, Any]) -> Grid | None:
    """The grid RTN chose for the checkpoint tensors of one of our weights (quant: its
    quantization_config): GPTQ rounds on it and AWQ's searches round to it; None for a weight
    the checkpoint keeps float (an MoE router: quantization_config's modules_to_not_convert)."""
    bits = quant["bits"].get(link.hf_names[0])
    if bits is None:
        return None
    flipped = link.hf_names[0] in quant.get("flipped", ())
    if bits == 8:
        return Grid(8, "column" if link.transpose else "row")
    if link.transpose and not flipped:
        raise ConfigError(
            f"{name}: its checkpoint stores it transposed and int4 groups its "
            f"{quant['group_size']}-wide groups along the output there, which calibrated "
            "rounding (grouped along the input) cannot match; pick a quantize.group_size that "
            "divides its input features, or quantize.method=rtn"
        )
    return Grid(4, "group", quant["group_size"])


def gptq_blocks(
    model: nn.Module,
    ids: Tensor,
    grid: Callable[[str], Grid | None],
    damp: float,
    act_order: bool,
    advance: Callable[[], None] = lambda: None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """GPTQ on every Linear of model's blocks in order, on calibration windows ids (n, T);
    grid(name) says how to round the weight `name` (None: it stays float, an MoE router); a
    Linear no calibration token reached (an MoE expert) is rounded to nearest. Rounds model in
    place and returns
    {our weight name: (rounded weight, scales)}."""
    inputs = BlockInputs.first(model, ids)
    rounded: dict[str, tuple[Tensor, Tensor]] = {}
    unreached: list[str] = []
    thin: list[str] = []
    for i, block in enumerate(model.blocks):
        found = hessians(inputs, block)
        for name, linear in block_linears(block).items():
            full = f"blocks.{i}.{name}.weight"
            if grid(full) is None:
                continue
            h, seen = found.get(name, (None, 0))
            if h is None:
                unreached.append(full)
            elif seen < linear.in_features:
                thin.append(f"{full} ({seen} < {linear.in_features})")
            q, s = gptq_linear(full, linear.weight, h, grid(full), damp, act_order)
            with torch.no_grad():
                linear.weight.copy_(q)
            rounded[full] = (q, s)
        inputs.advance(block)
        advance()
    _warn_few_tokens(unreached, thin)
    return rounded


def gptq_linear(
    name: str, w: Tensor, h: Tensor | None, grid: Grid, damp: float, act_order: bool
) -> tuple[Tensor, Tensor]:
    """GPTQ of the weight `name` on its inputs' Hessian h; RTN when there is none (no
    calibration token reached it: an MoE expert no token was routed to)."""
    if h is None:
        return rtn_weight(w, grid)
    try:
        return gptq_weight(w, h, grid, damp, act_order)
    except ConfigError as e:  # which of the model's matrices it was
        raise ConfigError(f"{name}: {e}") from None


def _warn_few_tokens(unreached: list[str], thin: list[str]) -> None:
    """One warning each for the weights no calibration token reached (rounded to nearest) and
    those with fewer tokens than inputs (H singular: GPTQ fits those tokens and may round other
    inputs worse than RTN; a rarely routed expert's case), not one per expert."""

    def some(names: list[str]) -> str:
        return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")

    if unreached:
        log.warning(
            "GPTQ: %d weights saw no calibration tokens (MoE experts no token was routed to) "
            "and were rounded to nearest: %s", len(unreached), some(unreached),
        )  # fmt: skip
    if thin:
        log.warning(
            "GPTQ: %d weights saw fewer calibration tokens than their inputs, so their Hessians "
            "are singular and the rounding fits those tokens; raise "
            "quantize.calibration_samples: %s", len(thin), some(thin),
        )  # fmt: skip


def awq_blocks(
    model: nn.Module,
    ids: Tensor,
    grid: Callable[[str], Grid | None],
    n_grid: int,
    advance: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """AWQ's scales searched and folded into model's blocks in order, then its clipping search
    (the scales leave the float model's function as it was, the clipping moves it a little
    for better rounding); returns the alpha chosen per group."""
    inputs = BlockInputs.first(model, ids)
    alphas: dict[str, float] = {}
    for i, block in enumerate(model.blocks):
        found = awq_block(block, linear_inputs_of(inputs, block),
                          lambda name, i=i: grid(f"blocks.{i}.{name}.weight"), n_grid)  # fmt: skip
        alphas.update({f"blocks.{i}.{group}": alpha for group, alpha in found.items()})
        inputs.advance(block)
        advance()
    return alphas


def scaled_tensors(
    model: nn.Module, tensors: dict[str, Tensor], links: dict[str, Rule]
) -> dict[str, Tensor]:
    """The checkpoint's float tensors with its blocks' tensors taken from model (AWQ-scaled)."""
    state = {k: v for k, v in model.state_dict().items() if k.startswith("blocks.") and k in links}
    return {**tensors, **ours_to_hf(state, [links[k] for k in state])}


def write_rounded(
    tensors: dict[str, Tensor],
    quant: dict[str, Any],
    rounded: dict[str, tuple[Tensor, Tensor]],
    links: dict[str, Rule],
) -> dict[str, Tensor]:
    """tensors (RTN's codes and scales) with those of the rounded weights replaced by theirs."""
    rules = [links[o] for o in rounded]
    weights = ours_to_hf({o: q for o, (q, _) in rounded.items()}, rules)
    scales = ours_to_hf({o: s for o, (_, s) in rounded.items()}, rules)
    out = dict(tensors)
    flipped = set(quant.get("flipped", ()))
    for name, w in weights.items():
        s = scales[name]
        w, s = (w.T, s.T) if name in flipped else (w, s)
        scale = _stored_scale(name, s, quant["bits"][name], quant["group_size"])
        out[name] = encode_weight(w, scale, quant["bits"][name], quant["group_size"])
        out[name + SCALE_SUFFIX] = scale.contiguous()
    return out


def _stored_scale(name: str, s: Tensor, bits: int, group_size: int) -> Tensor:
    """The scale tensor in quantize_weight's layout from (rows, cols) per-weight scales: a
    scale per stored row (int8) or per group of columns (int4); checks it is constant there."""
    rows, cols = s.shape
    groups = s.reshape(rows, 1, cols) if bits == 8 else s.reshape(rows, -1, group_size)
    scale = groups[..., :1]
    if not torch.equal(scale.expand_as(groups), groups):
        raise RuntimeError(f"{name}: GPTQ's scales do not follow the checkpoint's int{bits} layout")
    return scale.reshape(rows, 1) if bits == 8 else scale
