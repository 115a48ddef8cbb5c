"""compress distill: the KD loss, and a student trained from a teacher through the one loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.compress.distill import distill_loss
from lmforge.compress.stage import CompressConfig, compress
from lmforge.errors import ConfigError

from .test_prune import write_tokens


def test_distill_loss_is_softened_kl_plus_hard_ce() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    labels = torch.randint(0, 11, (2, 3))
    loss, soft, hard = distill_loss(s, t, labels, temperature=2.0, alpha=0.25)
    p_t = F.softmax(t / 2, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    assert torch.allclose(soft, kl, atol=1e-5)
    assert torch.allclose(hard, F.cross_entropy(s.flatten(0, 1), labels.flatten()))
    assert torch.allclose(loss, 0.25 * kl + 0.75 * hard, atol=1e-5)
    same = distill_loss(t, t, labels, temperature=2.0, alpha=1.0)[1]
    assert same.abs().item() < 1e-6  # a student equal to its teacher has nothing to learn


def test_distill_stage_trains_a_student_towards_the_teacher(
    trained_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    tokens = write_tokens(trained_dir, tmp_path / "tokens")
    train = {"max_steps": 40, "seq_len": 32, "micro_batch_size": 4, "lr": 3e-3,
             "ckpt_every": 0, "eval_every": 0, "eval_steps": 2, "warmup_steps": 2}  # fmt: skip
    out = compress(CompressConfig(method="distill", model=trained_dir, data=data_dir,
                                  tokens=tokens, train=train, out=tmp_path / "d"))  # fmt: skip
    report = json.loads((out / "compression.json").read_text())
    d = report["distillation"]
    assert d["steps"] == 40 and d["student"] == "micro"
    vocab = json.loads((out / "final" / "config.json").read_text())["vocab_size"]
    assert report["after"]["perplexity"] < vocab / 4  # far better than a uniform guess
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kl = [r["kl"] for r in rows if "kl" in r]
    assert kl[-1] < kl[0]  # the student moved towards the teacher


def test_distill_without_tokens_is_a_config_error(trained_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs tokens"):
        compress(CompressConfig(method="distill", model=trained_dir, out=tmp_path / "d"))
