"""2 CPU processes over gloo through real torchrun: the loss curve matches one process.

Both runs see the same global batch (2 ranks x 4 rows = 1 process x 8 rows: the loader gives
each rank its share of every global batch), so the curves differ only by float reduction order.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .test_pretrain_stage import lmforge, make_shards

STEPS = 12
ARGS = [
    "--preset", "micro", "--set", f"train.max_steps={STEPS}", "--set", "train.seq_len=32",
    "--set", "train.eval_every=6", "--set", "train.eval_steps=2", "--set", "train.ckpt_every=6",
    "--set", "train.device=cpu", "--set", "train.lr=3e-3",
]  # fmt: skip


def _curve(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [
        r["val_loss"] for r in rows if "val_loss" in r
    ]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    tokens, tok_dir = make_shards(root, n_docs=200)
    common = ["pretrain", "--tokens", str(tokens), "--tokenizer", str(tok_dir), *ARGS]
    lmforge(*common, "--out", str(root / "single"), "--set", "train.micro_batch_size=8")
    return root, common


@pytest.mark.integration
@pytest.mark.parametrize(
    "mode",
    [
        ["--set", "train.distributed=ddp"],
        ["--set", "train.distributed=fsdp"],
        # ZeRO-1's code path is covered in-process by tests/unit/train/test_zero1.py
        pytest.param(
            ["--set", "train.distributed=ddp", "--set", "train.zero1=true"], marks=pytest.mark.slow
        ),
    ],
    ids=["ddp", "fsdp", "ddp-zero1"],
)
def test_two_ranks_match_one_process(single, mode):
    root, common = single
    out = root / f"ranks-{'-'.join(mode[1::2])}".replace("=", "_")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "lmforge.cli", "--quiet", *common, "--out", str(out),
        "--set", "train.micro_batch_size=4", *mode,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    train_1, val_1 = _curve(root / "single")
    train_2, val_2 = _curve(out)
    assert len(train_2) == STEPS and len(val_2) == 2
    assert train_2 == pytest.approx(train_1, rel=1e-4)
    assert val_2 == pytest.approx(val_1, rel=1e-4)
    assert train_2[-1] < train_2[0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["tokens_seen"] == STEPS * 8 * 32
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "checkpoints" / f"step_{STEPS}" / "rng_rank1.pt").is_file()
