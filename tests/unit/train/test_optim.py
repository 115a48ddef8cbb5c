"""Optimizer registry, parameter groups and learning-rate schedules."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lmforge.train.config import TrainConfig
from lmforge.train.optim import Lamb, OptimizerList, build_optimizer, decay_groups, lr_at, set_lr

from .helpers import TinyLM


def test_no_weight_decay_on_norms_biases_embeddings():
    model = TinyLM()
    decay, no_decay = decay_groups(model, 0.1)
    decayed = {id(p) for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert id(model.wte.weight) not in decayed  # embedding (and the tied head)
    assert id(model.ln_f.weight) not in decayed and id(model.ln_f.bias) not in decayed
    assert id(model.blocks[0][0].bias) not in decayed
    assert decayed == {id(model.blocks[0][0].weight), id(model.blocks[0][2].weight)}


def test_frozen_parameters_are_left_out():
    model = TinyLM()
    model.wte.weight.requires_grad_(False)
    params = [p for g in decay_groups(model, 0.1) for p in g["params"]]
    assert all(p.requires_grad for p in params)
    assert len(params) == sum(p.requires_grad for p in model.parameters())


def test_warmup_then_cosine_reaches_min_lr():
    cfg = TrainConfig(max_steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cos = 0
    assert lr_at(100, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_linear_constant_and_wsd_shapes():
    base = dict(max_steps=100, lr=2.0, warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(50, TrainConfig(**base, schedule="linear")) == pytest.approx(1.0)
    assert lr_at(99, TrainConfig(**base, schedule="constant")) == pytest.approx(2.0)
    wsd = TrainConfig(**base, schedule="wsd", decay_ratio=0.2)
    assert lr_at(79, wsd) == pytest.approx(2.0)  # stable until the last 20%
    assert lr_at(90, wsd) == pytest.approx(1.0)  # half way down the decay
    assert lr_at(100, wsd) == pytest.approx(0.0)


def test_set_lr_scales_each_group_from_its_own_peak():
    model = TinyLM()
    cfg = TrainConfig(max_steps=10, lr=1e-2, warmup_steps=0, schedule="constant")
    groups = [
        {"params": list(model.blocks.parameters()), "lr": 1e-3},
        {"params": [model.wte.weight]},
    ]
    opt = build_optimizer(model, cfg, groups)
    cfg2 = TrainConfig(max_steps=10, lr=1e-2, warmup_steps=10)
    set_lr(opt, 4, cfg2)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5)
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-2 * 0.5)


def test_lamb_update_is_scaled_by_trust_ratio():
    w = torch.nn.Parameter(torch.full((4,), 3.0))
    opt = Lamb([w], lr=0.1, betas=(0.9, 0.999))
    w.grad = torch.tensor([1.0, -1.0, 1.0, -1.0]) * 1e-3
    opt.step()
    # first Adam step is sign(grad) (norm 2); trust ratio ||w||/||u|| = 6/2, so each coord moves lr*3
    assert torch.allclose(w.detach(), torch.tensor([2.7, 3.3, 2.7, 3.3]), atol=1e-4)


def test_lamb_minimises_a_quadratic():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 8))
    opt = Lamb([w], lr=0.05)
    for i in range(200):
        # A decaying lr, as LAMB is run: at a constant lr the trust-ratio-scaled steps keep
        # orbiting the minimum at about lr * ||w|| / ||update|| per coordinate.
        opt.param_groups[0]["lr"] = 0.05 * (1 - i / 200)
        opt.zero_grad()
        (w - 1.0).pow(2).sum().backward()
        opt.step()
    assert (w - 1.0).abs().max() < 0.05


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch without Muon")
def test_muon_on_hidden_matrices_adamw_on_the_rest():
    model = TinyLM()
    opt = build_optimizer(model, TrainConfig(optimizer="muon"))
    assert isinstance(opt, OptimizerList)
    muon, adamw = opt.parts
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    assert muon_ids == {id(model.blocks[0][0].weight), id(model.blocks[0][2].weight)}
    before = model.blocks[0][0].weight.detach().clone()
    model(torch.zeros(2, 4, dtype=torch.long)).sum().backward()
    opt.step()
    assert not torch.equal(before, model.blocks[0][0].weight)
    restored = build_optimizer(TinyLM(), TrainConfig(optimizer="muon"))
    restored.load_state_dict(opt.state_dict())
    assert len(restored.state) == len(opt.state) > 0


def test_muon_lr_schedule_applies_to_both_parts():
    model = TinyLM()
    cfg = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02, warmup_steps=10, max_steps=20)
    opt = build_optimizer(model, cfg)
    set_lr(opt, 4, cfg)
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert math.isclose(lrs[-1], 0.02 * 0.5) and math.isclose(lrs[0], 1e-3 * 0.5)
