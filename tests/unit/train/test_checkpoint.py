"""Checkpoints: round trip, tied weights, RNG, atomic layout and retention."""

from __future__ import annotations

import json
import random

import numpy as np
import torch

from lmforge.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from lmforge.train.config import TrainConfig
from lmforge.train.loader import TokenWindows
from lmforge.train.optim import build_optimizer

from .helpers import TinyLM


def _trained(seed: int = 0):
    torch.manual_seed(seed)
    model = TinyLM()
    opt = build_optimizer(model, TrainConfig())
    model(torch.arange(8).view(2, 4)).sum().backward()
    opt.step()
    return model, opt


def test_round_trip_restores_weights_optimizer_loader_and_rng(tmp_path):
    model, opt = _trained()
    loader = TokenWindows(np.arange(500, dtype=np.uint16), 8, 2)
    next(loader), next(loader)
    torch.manual_seed(123)
    path = save_checkpoint(tmp_path, 7, model, opt, loader=loader, loop_state={"step": 7})
    assert path.name == "step_7"
    assert sorted(p.name for p in path.iterdir()) == [
        "meta.json", "model.safetensors", "optimizer.pt", "rng_rank0.pt", "state.pt",
    ]  # fmt: skip
    expected_rand = torch.rand(3)

    fresh, fresh_opt = _trained(seed=1)
    fresh_loader = TokenWindows(np.arange(500, dtype=np.uint16), 8, 2)
    state = load_checkpoint(path, fresh, fresh_opt, loader=fresh_loader)
    assert state["step"] == 7 and state["loop"] == {"step": 7}
    for (name, a), (_, b) in zip(
        model.state_dict().items(), fresh.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert fresh.lm_head.weight is fresh.wte.weight  # still tied after loading
    assert fresh_loader.position == 2
    assert torch.equal(torch.rand(3), expected_rand)
    exp_avg = [s["exp_avg"] for s in opt.state.values()]
    assert all(
        torch.equal(a, s["exp_avg"]) for a, s in zip(exp_avg, fresh_opt.state.values(), strict=True)
    )


def test_rng_state_covers_python_numpy_torch():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_retention_keeps_last_k_and_best(tmp_path):
    model, opt = _trained()
    vals = {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5, 5: None}
    for step, val in vals.items():
        save_checkpoint(tmp_path, step, model, opt, val_loss=val, keep_last=2, keep_best=True)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["step_2", "step_4", "step_5"]
    assert json.loads((tmp_path / "step_2" / "meta.json").read_text())["val_loss"] == 1.0
    assert prune_checkpoints(tmp_path, keep_last=1, keep_best=False) == [
        tmp_path / "step_2",
        tmp_path / "step_4",
    ]


def test_half_written_checkpoint_is_ignored_and_cleaned(tmp_path):
    model, opt = _trained()
    save_checkpoint(tmp_path, 1, model, opt)
    (tmp_path / ".step_2.tmp").mkdir()  # a save killed before its rename
    (tmp_path / "step_3").mkdir()  # no state.pt: not a checkpoint
    assert latest_checkpoint(tmp_path) == tmp_path / "step_1"
    save_checkpoint(tmp_path, 4, model, opt)
    assert not (tmp_path / ".step_2.tmp").exists()
    assert latest_checkpoint(tmp_path) == tmp_path / "step_4"
