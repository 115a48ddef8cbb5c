"""GPTQ and AWQ on a mixture of experts (micro-moe): the MLP norm's scale reaches the router and
every expert, an expert no calibration token was routed to keeps RTN, and the written
checkpoint loads."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lmforge.compress.awq import fold_scales, scale_groups
from lmforge.compress.quantize import calibrated_rounding, quantize_dir
from lmforge.compress.stage import QuantizeSettings
from lmforge.model.config import preset_config
from lmforge.model.convert import load_pretrained
from lmforge.model.moe import moe_layers
from lmforge.model.quant_rounding import dequantize_weight, quantize_weight
from lmforge.model.transformer import Transformer
from unit.evals.helpers import make_model_dir

LOG = logging.getLogger(__name__)


def test_moe_scale_groups_reach_the_router_and_every_expert_and_keep_the_logits() -> None:
    torch.manual_seed(0)
    model = Transformer(preset_config("micro-moe")).eval()  # 4 experts, top-2; 2 kv heads
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref = model(ids)
    for block in model.blocks:
        groups = scale_groups(block)
        experts = [f"mlp.experts.{e}" for e in range(4)]
        assert [g.producer for g in groups] == [
            "attn_norm",
            "mlp_norm",
            *(f"{e}.fc" for e in experts),
        ]
        assert groups[1].consumers == ("mlp.router", *(f"{e}.fc" for e in experts))
        for group in groups:
            width = block.get_submodule(group.consumers[0]).in_features
            fold_scales(block, group, torch.rand(width) * 4 + 0.25)
    with torch.no_grad():
        assert torch.allclose(model(ids), ref, atol=1e-5, rtol=0)


def unreached_experts(src: Path, ids: torch.Tensor) -> list[int]:
    """Experts of the first MoE layer no token of ids is routed to (its inputs are the float
    embeddings, so calibration routes them the same way)."""
    model = load_pretrained(src)
    layer = moe_layers(model)[0]
    chosen: list[torch.Tensor] = []  # the router's top-k per token (the softmax keeps the order)
    layer.router.register_forward_hook(lambda *a: chosen.append(a[2].topk(layer.top_k).indices))
    with torch.no_grad():
        model(ids)
    counts = torch.bincount(chosen[0].flatten(), minlength=layer.num_experts)
    return [e for e, n in enumerate(counts.tolist()) if n == 0]


def rtn_weight_of(original: torch.nn.Module, loaded: torch.nn.Module, name: str) -> bool:
    """Whether the loaded (dequantized) weight `name` is the original's int4 g32 RTN."""
    w = original.get_submodule(name).weight.detach()
    rtn = dequantize_weight(*quantize_weight(w, 4, 32), 4, 32)
    return torch.allclose(loaded.get_submodule(name).weight, rtn, atol=1e-6)


def calibrated_moe(
    method: str, tmp_path: Path
) -> tuple[list[int], torch.nn.Module, torch.nn.Module]:
    """micro-moe quantized int4 g32 by method on 2 tokens: (the first MoE layer's experts no
    token reached, the float model, the checkpoint loaded dequantized)."""
    src = make_model_dir(tmp_path / "src", preset="micro-moe")
    ids = torch.tensor([[5, 9]])  # 2 tokens x top-2: at most 4 (token, expert) pairs of 4 x 2
    idle = unreached_experts(src, ids)
    assert idle  # the case under test
    calibrate = calibrated_rounding(ids, QuantizeSettings(method=method), LOG)
    quant = quantize_dir(src, tmp_path / "q", "int4", 32, calibrate)
    assert quant["bits"]["model.layers.0.block_sparse_moe.experts.0.w1.weight"] == 4  # Mixtral
    assert "model.layers.0.block_sparse_moe.gate.weight" not in quant["bits"]  # routers float
    assert quant["modules_to_not_convert"] == [
        f"model.layers.{i}.block_sparse_moe.gate" for i in range(2)
    ]
    kept = load_pretrained(tmp_path / "q")
    assert type(kept.blocks[0].mlp.router) is torch.nn.Linear
    with torch.no_grad():
        logits = kept(torch.randint(0, 250, (2, 16)))
    assert torch.isfinite(logits).all()
    return idle, load_pretrained(src), load_pretrained(tmp_path / "q", quantized="dequantize")


def test_gptq_rounds_experts_no_token_reached_to_nearest(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="lmforge.compress.calibrated"):
        idle, original, loaded = calibrated_moe("gptq", tmp_path)
    unreached, thin = (r.getMessage() for r in caplog.records)  # one warning each, not one a weight
    assert "saw no calibration tokens" in unreached
    assert f"blocks.0.mlp.experts.{idle[0]}.fc.weight" in unreached
    assert "fewer calibration tokens than their inputs" in thin
    assert "blocks.0.attn.qkv.weight (2 < 64)" in thin
    for e in range(4):
        for part in ("fc", "proj"):
            name = f"blocks.0.mlp.experts.{e}.{part}"
            assert rtn_weight_of(original, loaded, name) == (e in idle), name
    router = "blocks.0.mlp.router"  # kept float: GPTQ leaves it as it was
    assert torch.equal(loaded.get_submodule(router).weight, original.get_submodule(router).weight)


def test_awq_scales_every_expert_by_the_norm_and_skips_pairs_no_token_reached(tmp_path: Path):
    idle, original, loaded = calibrated_moe("awq", tmp_path)
    for e in idle:  # its gate/up took the norm's scale; its down had no inputs to search on
        assert not rtn_weight_of(original, loaded, f"blocks.0.mlp.experts.{e}.fc")
        assert rtn_weight_of(original, loaded, f"blocks.0.mlp.experts.{e}.proj")


def write_fused_layout(src: Path) -> None:
    """Rewrite src's Mixtral checkpoint in transformers' in-memory layout: each layer's experts
    fused into (experts, rows, cols) tensors, the router under mlp.gate."""
    from safetensors.torch import load_file, save_file

    hub, fused = load_file(src / "model.safetensors"), {}
    for layer in range(2):
        moe, mlp = f"model.layers.{layer}.block_sparse_moe.", f"model.layers.{layer}.mlp."
        experts = [f"{moe}experts.{e}." for e in range(4)]
        fused[mlp + "gate.weight"] = hub.pop(moe + "gate.weight")
        fused[mlp + "experts.gate_up_proj"] = torch.stack(
            [torch.cat([hub.pop(e + "w1.weight"), hub.pop(e + "w3.weight")]) for e in experts]
        )
        fused[mlp + "experts.down_proj"] = torch.stack([hub.pop(e + "w2.weight") for e in experts])
    save_file({**fused, **hub}, src / "model.safetensors", metadata={"format": "pt"})


def test_fused_expert_checkpoints_are_quantized_as_the_hub_layout_is(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    hub = make_model_dir(tmp_path / "hub", preset="micro-moe")
    fused = make_model_dir(tmp_path / "fused", preset="micro-moe")
    write_fused_layout(fused)
    quantize_dir(hub, tmp_path / "q_hub", "int4", 32)
    quant = quantize_dir(fused, tmp_path / "q_fused", "int4", 32)  # experts stayed float before
    assert quant["bits"]["model.layers.1.block_sparse_moe.experts.3.w2.weight"] == 4
    want, got = (
        load_file(tmp_path / "q_hub/model.safetensors"),
        load_file(tmp_path / "q_fused/model.safetensors"),
    )
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    ids = torch.tensor([[5, 9, 13, 2]])
    calibrate = calibrated_rounding(ids, QuantizeSettings(method="gptq"), LOG)
    quantize_dir(fused, tmp_path / "g", "int4", 32, calibrate)  # a KeyError before
    with torch.no_grad():
        assert torch.isfinite(load_pretrained(tmp_path / "g")(ids)).all()


def test_calibrated_methods_round_each_matrix_once(tmp_path: Path, monkeypatch) -> None:
    """RTN rounds each quantized matrix once under GPTQ and AWQ (AWQ rounded the whole
    checkpoint twice, the first result thrown away)."""
    from lmforge.model import quant_checkpoint

    rounded: list[tuple[int, ...]] = []

    def counted(w: torch.Tensor, bits: int, group_size: int):
        rounded.append(tuple(w.shape))
        return quantize_weight(w, bits, group_size)

    monkeypatch.setattr(quant_checkpoint, "quantize_weight", counted)
    src = make_model_dir(tmp_path / "src", preset="micro-moe")
    ids = torch.tensor([[5, 9, 13, 2]])
    for method in ("gptq", "awq"):
        rounded.clear()
        calibrate = calibrated_rounding(ids, QuantizeSettings(method=method), LOG)
        quant = quantize_dir(src, tmp_path / method, "int4", 32, calibrate)
        assert len(rounded) == len(quant["bits"]), method
