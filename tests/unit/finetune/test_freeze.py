"""Partial freezing and layer-wise learning-rate groups."""

import pytest
import torch
from torch import nn

from lmforge.finetune.freeze import FreezeConfig, apply_freeze, layer_of, param_groups
from lmforge.model.config import preset_config
from lmforge.model.transformer import Transformer
from lmforge.train.config import TrainConfig
from lmforge.train.optim import build_optimizer


class WithHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.lm = Transformer(preset_config("micro", n_layer=3))
        self.head = nn.Linear(64, 3)


def test_layer_of():
    assert layer_of("tok_emb.weight", 3) == 0
    assert layer_of("lm.tok_emb.weight", 3) == 0
    assert layer_of("lm.blocks.0.attn.qkv.weight", 3) == 1
    assert layer_of("blocks.2.mlp.fc.weight", 3) == 3
    assert layer_of("norm_f.weight", 3) == 4


def test_freeze_embeddings_first_layers_and_patterns():
    m = WithHead()
    cfg = FreezeConfig(embeddings=True, first_n_layers=2, patterns=["*mlp_norm*"])
    apply_freeze(m, cfg, n_layer=3)
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert "lm.tok_emb.weight" in frozen
    assert all(
        any(n.startswith(f"lm.blocks.{i}.") for i in (0, 1)) or "mlp_norm" in n or "emb" in n
        for n in frozen
    )
    assert "lm.blocks.1.mlp.proj.weight" in frozen
    assert "lm.blocks.2.mlp.proj.weight" not in frozen
    assert "lm.blocks.2.mlp_norm.weight" in frozen
    assert "head.weight" not in frozen and "lm.norm_f.weight" not in frozen


def test_layerwise_lr_and_head_rate_reach_the_optimizer():
    m = WithHead()
    groups = param_groups(m, FreezeConfig(layer_lr_decay=0.5, head_lr=0.05), 0.01, 0.1, n_layer=3)
    by_name = {}
    for g in groups:
        assert by_name.setdefault(g["name"], g["lr"]) == g["lr"]  # decay/no-decay agree
    assert by_name["head"] == 0.05
    assert by_name["layer4"] == pytest.approx(0.01)
    assert by_name["layer3"] == pytest.approx(0.005)
    assert by_name["layer1"] == pytest.approx(0.00125)
    assert by_name["layer0"] == pytest.approx(0.000625)
    for g in groups:  # no decay on 1-d tensors and embeddings
        if any(p.ndim < 2 for p in g["params"]):
            assert g["weight_decay"] == 0.0
    n_params = sum(p.numel() for g in groups for p in g["params"])
    assert n_params == sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())
    opt = build_optimizer(m, TrainConfig(lr=0.01), groups)
    assert sorted({g["base_lr"] for g in opt.param_groups})[-1] == 0.05


def test_frozen_parameters_are_left_out_of_groups():
    m = WithHead()
    apply_freeze(m, FreezeConfig(first_n_layers=3, embeddings=True), n_layer=3)
    groups = param_groups(m, FreezeConfig(), 0.01, 0.0, n_layer=3)
    assert {g["name"] for g in groups} == {"layer4", "head"}
    assert all(p.requires_grad for g in groups for p in g["params"])
    assert torch.is_tensor(groups[0]["params"][0])
