"""CPU training throughput: lmforge's pretraining step vs nanoGPT's training loop, same shape.

The shape is nanoGPT's documented CPU configuration (README, "I only have a macbook"):
4 layers, 4 heads, 128 wide, block 64, batch 12, vocab 65 (shakespeare_char), dropout 0, no
bias, GELU MLP, learned positions, tied embeddings, AdamW lr 1e-3 betas (0.9, 0.99), grad clip 1.

lmforge runs the real `lmforge.train.loop.train()` (TokenWindows loader, fused AdamW, metrics and
progress bookkeeping included) on `Transformer` configured to the same architecture. nanoGPT runs
its own `model.py` (imported from --nanogpt-dir, never vendored here) in a transcription of its
train.py iteration: get_batch from a memmap, forward, backward, clip, step, zero_grad, loss.item().
Both use the same uint16 token file. Rounds alternate A/B to spread out noise from a shared
machine; the ratio reported is of the medians (and of the best rounds).

    python benchmarks/bench_train_cpu.py --nanogpt-dir /tmp/nanogpt

(get model.py with: git --git-dir <nanoGPT mirror> show HEAD:model.py > /tmp/nanogpt/model.py)
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from lmforge.artifacts import StageContext
from lmforge.common.logging import MetricsWriter, read_metrics
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.train.config import TrainConfig
from lmforge.train.loader import TokenWindows
from lmforge.train.loop import train
from lmforge.train.pretrain import lm_loss

SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65)
BATCH, LR, BETAS = 12, 1e-3, (0.9, 0.99)


def make_tokens(path: Path, n: int = 1_000_000) -> np.ndarray:
    rng = np.random.default_rng(0)
    rng.integers(0, SHAPE["vocab_size"], n, dtype=np.uint16).tofile(path)
    return np.memmap(path, dtype=np.uint16, mode="r")


def run_lmforge(tokens_path: Path, warmup: int, steps: int) -> float:
    """tokens/s of the steps after `warmup`, from metrics.jsonl timestamps (all overhead counted)."""
    cfg = ModelConfig(
        vocab_size=SHAPE["vocab_size"], n_layer=SHAPE["n_layer"], n_head=SHAPE["n_head"],
        n_kv_head=SHAPE["n_head"], n_embd=SHAPE["n_embd"], intermediate_size=4 * SHAPE["n_embd"],
        block_size=SHAPE["block_size"], norm="layernorm", pos="learned", mlp="gelu", bias=False,
        tie_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(cfg)
    tc = TrainConfig(
        max_steps=warmup + steps, lr=LR, betas=BETAS, micro_batch_size=BATCH,
        seq_len=SHAPE["block_size"], warmup_steps=0, eval_every=0, ckpt_every=0, grad_clip=1.0,
        weight_decay=0.1, device="cpu",
    )  # fmt: skip
    tokens = np.memmap(tokens_path, dtype=np.uint16, mode="r")
    loader = TokenWindows(tokens, tc.seq_len, tc.micro_batch_size, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        ctx = StageContext(out, "bench", logging.getLogger("bench"), MetricsWriter(out / "m.jsonl"))
        train(model, lm_loss, loader, tc, ctx)
        ctx.metrics.close()
        rows = {r["step"]: r for r in read_metrics(out / "m.jsonl")}
    first, last = rows[warmup], rows[warmup + steps]
    return (last["tokens_seen"] - first["tokens_seen"]) / (last["time"] - first["time"])


def run_nanogpt(nanogpt_dir: Path, tokens_path: Path, warmup: int, steps: int) -> float:
    """tokens/s of nanoGPT's train.py iteration over the same steps."""
    sys.path.insert(0, str(nanogpt_dir))
    from model import GPT, GPTConfig  # nanoGPT's model.py

    torch.manual_seed(0)
    model = GPT(GPTConfig(**SHAPE, dropout=0.0, bias=False))
    optimizer = model.configure_optimizers(0.1, LR, BETAS, "cpu")
    ctx, block = nullcontext(), SHAPE["block_size"]

    def get_batch():  # train.py: the memmap is recreated every batch to avoid a memory leak
        data = np.memmap(tokens_path, dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - block, (BATCH,))
        x = torch.stack([torch.from_numpy(data[i : i + block].astype(np.int64)) for i in ix])
        y = torch.stack(
            [torch.from_numpy(data[i + 1 : i + 1 + block].astype(np.int64)) for i in ix]
        )
        return x, y

    x, y = get_batch()
    t0 = None
    for it in range(warmup + steps):
        if it == warmup:
            t0 = time.perf_counter()
        for group in optimizer.param_groups:  # get_lr + set (constant here, as our warmup=0 run)
            group["lr"] = LR
        with ctx:
            _, loss = model(x, y)
        x, y = get_batch()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # log_interval=1 in nanoGPT's CPU command
    return steps * BATCH * block / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--nanogpt-dir", type=Path, required=True, help="directory with nanoGPT's model.py"
    )
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not (args.nanogpt_dir / "model.py").is_file():
        sys.exit(f"{args.nanogpt_dir}/model.py not found; see this file's docstring")
    logging.getLogger("lmforge").setLevel(logging.WARNING)
    ours, theirs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tokens_path = Path(tmp) / "train.bin"
        make_tokens(tokens_path)
        for r in range(args.rounds):
            theirs.append(run_nanogpt(args.nanogpt_dir, tokens_path, args.warmup, args.steps))
            ours.append(run_lmforge(tokens_path, args.warmup, args.steps))
            print(
                f"round {r + 1}: lmforge {ours[-1]:,.0f} tok/s  nanoGPT {theirs[-1]:,.0f} tok/s",
                flush=True,
            )
    result = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lmforge_tokens_per_s": round(statistics.median(ours)),
        "nanogpt_tokens_per_s": round(statistics.median(theirs)),
        "ratio": round(statistics.median(ours) / statistics.median(theirs), 3),
        # the best round of each is least disturbed by other processes on a shared machine
        "ratio_best": round(max(ours) / max(theirs), 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
