"""micro-moe over 2 CPU processes (gloo, real torchrun): DDP and FSDP2 train a mixture of experts,
whose experts may see no token on a rank in a step, and match one process's loss curve."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .test_pretrain_distributed import ARGS, _curve
from .test_pretrain_stage import lmforge, make_shards

MOE_ARGS = ["micro-moe" if a == "micro" else a for a in ARGS]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.mark.integration
@pytest.mark.slow  # ~80 s on the 2-core VM: three pretraining runs, two of them on 2 ranks
def test_two_ranks_train_a_mixture_of_experts_like_one_process(tmp_path):
    tokens, tok_dir = make_shards(tmp_path, n_docs=200)
    common = ["pretrain", "--tokens", str(tokens), "--tokenizer", str(tok_dir), *MOE_ARGS]
    lmforge(*common, "--out", str(tmp_path / "single"), "--set", "train.micro_batch_size=8")
    one, _ = _curve(tmp_path / "single")
    for mode in ("ddp", "fsdp"):
        ranks = ["--set", "train.micro_batch_size=4", "--set", f"train.distributed={mode}"]
        cmd = [*TORCHRUN, "-m", "lmforge.cli", "--quiet", *common, "--out", str(tmp_path / mode)]
        proc = subprocess.run([*cmd, *ranks], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        two, _ = _curve(tmp_path / mode)
        # each rank balances its own half of the batch, so the aux term (0.01 x ~2) differs a bit
        assert two == pytest.approx(one, rel=3e-3), mode
        assert two[-1] < two[0]
