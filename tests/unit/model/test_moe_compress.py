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
from lmforge.model.quant_module import QuantModule
from lmforge.model.transformer import Transformer

from .test_convert import randomize


def _moe() -> Transformer:
    torch.manual_seed(0)
    return randomize(Transformer(preset_config("micro-moe")))


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


def test_int8_checkpoint_keeps_experts_quantized_and_close(tmp_path):
    model = _moe()
    save_pretrained(model, tmp_path / "float")
    quantize_dir(tmp_path / "float", tmp_path / "int8", "int8", 32)
    back = load_pretrained(tmp_path / "int8")
    assert isinstance(back.blocks[0].mlp.experts[2].fc, QuantModule)
    idx = torch.arange(1, 30)[None]
    with torch.no_grad():
        ref = model(idx)
        diff = (ref - back(idx)).abs().amax(-1)  # (1, T) per position
    # rounding moves a token's hidden state a little; one near a routing tie may switch an
    # expert, so the bound is on most positions rather than all
    close = diff < 0.05 * ref.abs().max()
    assert diff.max() > 0 and close.float().mean() >= 0.8
