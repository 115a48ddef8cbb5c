"""Compression of a mixture-of-experts model: what applies to experts (int8 checkpoints, magnitude
and head pruning) works, and what is written for dense MLPs (neuron pruning, GGUF) says so."""

from __future__ import annotations

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


# Decisive routers (weights x 10) for the quantization tests: a token near a routing tie could
# switch expert under rounding, a jump no tolerance bounds; far from ties rounding stays small.
DECISIVE = 10.0


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_checkpoint_keeps_experts_quantized(kind, tmp_path):
    """Kept quantized, experts and router run the int8/int4 kernels and compute what the same
    rounded weights compute in float (the dequantized load)."""
    save_pretrained(_moe(DECISIVE), tmp_path / "float")
    quantize_dir(tmp_path / "float", tmp_path / kind, kind, 32)
    kept = load_pretrained(tmp_path / kind)
    floats = load_pretrained(tmp_path / kind, quantized="dequantize")
    assert isinstance(kept.blocks[0].mlp.experts[2].fc, QuantModule)
    assert isinstance(kept.blocks[1].mlp.router, QuantModule)
    idx = torch.arange(1, 30)[None]
    with torch.no_grad():
        torch.testing.assert_close(kept(idx), floats(idx), atol=0.1, rtol=0)


def test_int8_checkpoint_stays_close_to_the_float_model(tmp_path):
    model = _moe(DECISIVE)
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


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_quantization_refuses_a_mixture_naming_rtn(method, tmp_path):
    """GPTQ/AWQ calibrate dense Linears on every token: on experts AWQ had no scale groups and
    GPTQ no Hessian for an expert no calibration token chose; RTN (tested above) is the way."""
    from lmforge.compress.stage import CompressConfig, compress

    save_pretrained(_moe(), tmp_path / "moe")
    (tmp_path / "moe" / "tokenizer.json").write_text("{}")  # refused before it is read
    cfg = CompressConfig(
        method="quantize", model=tmp_path / "moe", out=tmp_path / "c", tokens=tmp_path / "tok",
        quantize={"method": method},
    )  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"moe is a mixture of experts: GPTQ.*quantize.method=rtn"
    ):
        compress(cfg)
