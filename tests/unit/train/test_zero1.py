"""ZeRO-1 through the loop in one process (a world-size-1 gloo group), checkpoint included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from lmforge.train.config import TrainConfig
from lmforge.train.loader import TokenWindows
from lmforge.train.loop import train

from .helpers import TinyLM, bigram_tokens, lm_loss, make_ctx


@pytest.fixture
def gloo_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_zero1_trains_like_adamw_and_resumes(tmp_path, gloo_group, monkeypatch):
    from lmforge.train import distributed

    built = []
    real = distributed.zero1_optimizer
    monkeypatch.setattr(
        distributed, "zero1_optimizer", lambda *a, **k: built.append(real(*a, **k)) or built[-1]
    )
    tokens = bigram_tokens(5000)
    cfg = TrainConfig(max_steps=6, lr=1e-2, micro_batch_size=4, seq_len=16, warmup_steps=0,
                      eval_every=0, ckpt_every=3, device="cpu", distributed="ddp", zero1=True)  # fmt: skip
    results = {}
    for name, c in (("zero1", cfg), ("plain", cfg.model_copy(update={"zero1": False}))):
        torch.manual_seed(0)
        loader = TokenWindows(tokens, 16, 4, seed=0)
        results[name] = train(TinyLM(), lm_loss, loader, c, make_ctx(tmp_path / name))
    assert len(built) == 1 and type(built[0]).__name__ == "ZeroRedundancyOptimizer"
    for a, b in zip(
        results["zero1"].state_dict.values(), results["plain"].state_dict.values(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6)
    saved = torch.load(
        tmp_path / "zero1" / "checkpoints" / "step_6" / "optimizer.pt", weights_only=True
    )
    assert len(saved["state"]) > 0  # consolidated state of every shard

    # resume from step 3: the same final weights
    import shutil

    shutil.rmtree(tmp_path / "zero1" / "checkpoints" / "step_6")
    torch.manual_seed(0)
    resumed = train(
        TinyLM(), lm_loss, TokenWindows(tokens, 16, 4, seed=0), cfg, make_ctx(tmp_path / "zero1")
    )
    assert resumed.resumed_from == 3
    for a, b in zip(resumed.state_dict.values(), results["zero1"].state_dict.values(), strict=True):
        assert torch.equal(a, b)
    assert np.isfinite(resumed.train_loss)


def test_ddp_leaves_each_ranks_buffers_alone(gloo_group):
    from lmforge.train.distributed import DistEnv, wrap_model

    env = DistEnv(rank=0, local_rank=0, world_size=2)  # wraps; DDP runs on the 1-rank group
    wrapped = wrap_model(TinyLM(), TrainConfig(distributed="ddp"), env, torch.device("cpu"))
    assert type(wrapped).__name__ == "DistributedDataParallel"
    assert wrapped.broadcast_buffers is False  # a QLoRA base is not re-sent every forward
