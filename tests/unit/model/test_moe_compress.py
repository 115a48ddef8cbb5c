"""Compression of a mixture-of-experts model: what applies to experts (int8 checkpoints, magnitude
and head pruning) works, and what is written for dense MLPs (neuron pruning, GGUF) says so."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lmforge.compress.gguf_export import gguf_arch
from lmforge.compress.prune import magnitude_prune, prune_heads, prune_neurons, sparsity_of
from lmforge.compress.quantize import quantize_dir
from lmforge.errors import ConfigError
from lmforge.model.config import preset_config
from lmforge.model.convert import load_pretrained, save_pretrained
from lmforge.model.moe import moe_layers
from lmforge.model.quant_module import QuantModule
from lmforge.model.quant_rounding import dequantize_weight, quantize_weight
from lmforge.model.transformer import Transformer

from .test_convert import randomize


def _moe(router_scale: float = 1.0) -> Transformer:
    torch.manual_seed(0)
    model = randomize(Transformer(preset_config("micro-moe")))
    with torch.no_grad():
        for layer in moe_layers(model):
            layer.router.weight.mul_(router_scale)
    return model


def test_dense_only_operations_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match=r"neurons scores dense MLP units.*num_experts"):
        prune_neurons(_moe(), 0.5)
    with pytest.raises(ConfigError, match=r"as llama: num_experts=4 \(needs 0\)"):
        gguf_arch(preset_config("micro-moe"))


def test_magnitude_and_head_pruning_reach_the_experts():
    model = _moe()
    masks = magnitude_prune(model, 0.5, "layer")
    assert "blocks.0.mlp.experts.3.fc.weight" in masks
    assert sparsity_of(model) == pytest.approx(0.5, abs=0.01)
    pruned = prune_heads(_moe(), 0.5)
    assert pruned.config.num_experts == 4
    idx = torch.arange(1, 20)[None]
    with torch.no_grad():
        assert torch.isfinite(pruned(idx)).all()
    for a, b in zip(_moe().blocks[1].mlp.experts, pruned.blocks[1].mlp.experts, strict=True):
        assert torch.equal(a.proj.weight, b.proj.weight)  # experts are copied, not re-drawn


def _near_tie_routers(model: Transformer) -> Transformer:
    """Every MoE layer's experts scored within 1e-3 of each other for every token: each token
    sits at a routing tie that rounding the router's weights would break."""
    with torch.no_grad():
        for layer in moe_layers(model):
            w = layer.router.weight
            w.copy_(w[:1] + 1e-3 * torch.randn_like(w))
    return model


def _router_choices(model: Transformer, idx: torch.Tensor, routers=None) -> list[torch.Tensor]:
    """Each MoE layer's top-k experts per token of model(idx), scored by `routers` (default:
    model's own) on the inputs model's routers see."""
    layers = moe_layers(model)
    seen: list[torch.Tensor] = []
    hooks = [m.router.register_forward_pre_hook(lambda _m, a: seen.append(a[0])) for m in layers]
    with torch.no_grad():
        model(idx)
        for h in hooks:
            h.remove()
        routers = routers or [m.router for m in layers]
        k = model.config.num_experts_per_tok
        return [
            r(x).float().topk(k).indices.sort().values for r, x in zip(routers, seen, strict=True)
        ]


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_checkpoint_keeps_routers_float_so_near_ties_route_as_before(kind, tmp_path):
    """Routers stay float (quantization_config.modules_to_not_convert), kept quantized or
    dequantized: on the same inputs they choose the float model's experts even at near-ties,
    where the rounded router switches them."""
    model = _near_tie_routers(_moe())
    save_pretrained(model, tmp_path / "float")
    quant = quantize_dir(tmp_path / "float", tmp_path / kind, kind, 32)
    assert quant["modules_to_not_convert"] == [
        f"model.layers.{i}.block_sparse_moe.gate" for i in range(2)
    ]
    idx = torch.arange(1, 30)[None]
    for how in ("keep", "dequantize"):
        loaded = load_pretrained(tmp_path / kind, quantized=how)
        float_routers = [m.router for m in moe_layers(model)]
        for a, b in zip(float_routers, [m.router for m in moe_layers(loaded)], strict=True):
            assert type(b) is torch.nn.Linear and torch.equal(a.weight, b.weight)
        ours, floats = _router_choices(loaded, idx), _router_choices(loaded, idx, float_routers)
        assert all(torch.equal(a, b) for a, b in zip(ours, floats, strict=True))
    bits = 8 if kind == "int8" else 4
    rounded = [
        lambda x, w=dequantize_weight(*quantize_weight(f.weight, bits, 32), bits, 32): x @ w.T
        for f in float_routers
    ]  # what an RTN-rounded router would score
    switched = _router_choices(loaded, idx, rounded)
    assert not all(torch.equal(a, b) for a, b in zip(switched, floats, strict=True))  # the case


def test_quantized_checkpoint_keeps_experts_quantized_and_matches_its_dequantized_load(tmp_path):
    """Kept quantized, experts run the int4 kernels and compute what the same rounded weights
    compute in float (the dequantized load)."""
    save_pretrained(_moe(), tmp_path / "float")
    quantize_dir(tmp_path / "float", tmp_path / "int4", "int4", 32)
    kept = load_pretrained(tmp_path / "int4")
    floats = load_pretrained(tmp_path / "int4", quantized="dequantize")
    assert isinstance(kept.blocks[0].mlp.experts[2].fc, QuantModule)
    idx = torch.arange(1, 30)[None]
    with torch.no_grad():
        torch.testing.assert_close(kept(idx), floats(idx), atol=0.1, rtol=0)


def test_int8_checkpoint_stays_close_to_the_float_model(tmp_path):
    """Logits within 5% end to end. Routers are float, but rounded attention and experts move
    what the next router sees, and a token near a tie can then switch expert (a jump no
    tolerance bounds): decisive routers (weights x 10) keep the tokens far from ties."""
    model = _moe(router_scale=10.0)
    save_pretrained(model, tmp_path / "float")
    quantize_dir(tmp_path / "float", tmp_path / "int8", "int8", 32)
    back = load_pretrained(tmp_path / "int8")
    idx = torch.arange(1, 30)[None]
    with torch.no_grad():
        ref = model(idx)
        diff = (ref - back(idx)).abs().max().item()
    assert 0 < diff < 0.05 * ref.abs().max().item()


def test_compress_export_refuses_a_mixture_before_measuring(tmp_path):
    from lmforge.compress.stage import CompressConfig, compress

    save_pretrained(_moe(), tmp_path / "moe")
    (tmp_path / "moe" / "tokenizer.json").write_text("{}")  # refused before it is read
    cfg = CompressConfig(method="export", model=tmp_path / "moe", out=tmp_path / "c")
    with pytest.raises(ConfigError, match=r"moe is a mixture of experts.*method=quantize"):
        compress(cfg)


def test_lmforge_layout_mixture_keeps_its_routers_float(tmp_path):
    """A mixture saved in lmforge's own layout (raw top-k weights: no Mixtral form) names its
    routers by our names, and they stay float too."""
    model = randomize(Transformer(replace(preset_config("micro-moe"), norm_topk_prob=False)))
    save_pretrained(model, tmp_path / "float")
    quant = quantize_dir(tmp_path / "float", tmp_path / "int8", "int8", 32)
    assert quant["modules_to_not_convert"] == ["blocks.0.mlp.router", "blocks.1.mlp.router"]
    assert "blocks.0.mlp.experts.0.fc.weight" in quant["bits"]
    back = load_pretrained(tmp_path / "int8")
    assert type(back.blocks[1].mlp.router) is torch.nn.Linear
    assert torch.equal(back.blocks[1].mlp.router.weight, model.blocks[1].mlp.router.weight)
