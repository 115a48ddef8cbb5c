"""micro-moe over 2 CPU processes (gloo, real torchrun): DDP and FSDP2 train a mixture of experts,
whose experts may see no token on a rank in a step, and match one process's loss curve."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .test_pretrain_stage import lmforge, make_shards

STEPS = 12
ARGS = [
    "--preset", "micro-moe", "--set", f"train.max_steps={STEPS}", "--set", "train.seq_len=32",
    "--set", "train.eval_every=6", "--set", "train.eval_steps=2", "--set", "train.ckpt_every=0",
    "--set", "train.device=cpu", "--set", "train.lr=3e-3",
]  # fmt: skip


def _losses(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r for r in rows if "moe_aux_loss" in r]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-dist")
    tokens, tok_dir = make_shards(root, n_docs=200)
    common = ["pretrain", "--tokens", str(tokens), "--tokenizer", str(tok_dir), *ARGS]
    lmforge(*common, "--out", str(root / "single"), "--set", "train.micro_batch_size=8")
    return root, common


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_train_a_mixture_of_experts_like_one_process(single, mode):
    root, common = single
    out = root / mode
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "lmforge.cli", "--quiet", *common, "--out", str(out),
        "--set", "train.micro_batch_size=4", "--set", f"train.distributed={mode}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, _ = _losses(root / "single")
    two, routed = _losses(out)
    # each rank balances its own half of the batch, so the aux term (0.01 x ~2) differs a little
    assert two == pytest.approx(one, rel=3e-3)
    assert two[-1] < two[0] and routed
