"""CPU training throughput: lmforge's pretraining step vs nanoGPT's training loop, same shape.

The shape is nanoGPT's documented CPU configuration (README, "I only have a macbook"):
4 layers, 4 heads, 128 wide, block 64, batch 12, vocab 65 (shakespeare_char), dropout 0, no
bias, GELU MLP, learned positions, tied embeddings, AdamW lr 1e-3 betas (0.9, 0.99), grad clip 1.

lmforge runs the real `lmforge.train.loop.train()` (TokenWindows loader, fused AdamW, metrics and
progress bookkeeping included) on `Transformer` configured to the same architecture. nanoGPT runs
its own `model.py` (imported from --nanogpt-dir, never vendored here) in a transcription of its
train.py iteration: get_batch from a memmap, forward, backward, clip, step, zero_grad, loss.item().
Both use the same uint16 token file. Rounds alternate A/B to spread out noise from a shared
machine; the ratios reported are of the medians, by wall time and by process CPU time (the\nlatter barely moves when other jobs share the cores; use --threads 1 for the steadiest number).

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
from lmforge.common.logging import MetricsWriter
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


class _Clock:
    """Wraps a loader; notes wall and CPU time when the first timed step fetches its batch."""

    def __init__(self, loader: TokenWindows, warmup: int) -> None:
        self.loader, self.warmup, self.t0 = loader, warmup, None

    def __iter__(self):
        return self

    def __next__(self):
        if self.loader.position == self.warmup:
            self.t0 = (time.perf_counter(), time.process_time())
        return next(self.loader)


def our_model() -> torch.nn.Module:
    """lmforge's Transformer in GPT-2 style at nanoGPT's shape, with nanoGPT's exact (erf) GELU."""
    cfg = ModelConfig(
        vocab_size=SHAPE["vocab_size"], n_layer=SHAPE["n_layer"], n_head=SHAPE["n_head"],
        n_kv_head=SHAPE["n_head"], n_embd=SHAPE["n_embd"], intermediate_size=4 * SHAPE["n_embd"],
        block_size=SHAPE["block_size"], norm="layernorm", pos="learned", mlp="gelu_exact", bias=False,
        tie_embeddings=True,
    )  # fmt: skip
    return Transformer(cfg)


def nanogpt_model(nanogpt_dir: Path) -> torch.nn.Module:
    sys.path.insert(0, str(nanogpt_dir))
    from model import GPT, GPTConfig  # nanoGPT's model.py

    return GPT(GPTConfig(**SHAPE, dropout=0.0, bias=False))


def nanogpt_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """nanoGPT's model computes its loss itself when given targets."""
    return model(batch["input_ids"], batch["labels"].contiguous())[1], {}


def run_lmforge(
    model: torch.nn.Module, loss_fn, tokens_path: Path, warmup: int, steps: int
) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second) of lmforge's loop after `warmup` steps."""
    tc = TrainConfig(
        max_steps=warmup + steps, lr=LR, betas=BETAS, micro_batch_size=BATCH,
        seq_len=SHAPE["block_size"], warmup_steps=0, schedule="constant", eval_every=0,
        ckpt_every=0, grad_clip=1.0, weight_decay=0.1, device="cpu",
    )  # fmt: skip
    tokens = np.memmap(tokens_path, dtype=np.uint16, mode="r")
    loader = _Clock(TokenWindows(tokens, tc.seq_len, tc.micro_batch_size, seed=0), warmup)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        ctx = StageContext(out, "bench", logging.getLogger("bench"), MetricsWriter(out / "m.jsonl"))
        train(model, loss_fn, loader, tc, ctx)
        wall, cpu = time.perf_counter(), time.process_time()
        ctx.metrics.close()
    n = steps * BATCH * SHAPE["block_size"]
    return n / (wall - loader.t0[0]), n / (cpu - loader.t0[1])


def run_nanogpt(
    nanogpt_dir: Path, tokens_path: Path, warmup: int, steps: int
) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second) of nanoGPT's train.py iteration."""
    torch.manual_seed(0)
    model = nanogpt_model(nanogpt_dir)
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
            t0 = (time.perf_counter(), time.process_time())
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
    wall, cpu = time.perf_counter(), time.process_time()
    n = steps * BATCH * block
    return n / (wall - t0[0]), n / (cpu - t0[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--nanogpt-dir", type=Path, required=True, help="directory with nanoGPT's model.py"
    )
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.nanogpt_dir / "model.py").is_file():
        sys.exit(f"{args.nanogpt_dir}/model.py not found; see this file's docstring")
    logging.getLogger("lmforge").setLevel(logging.WARNING)
    runs: dict[str, list[tuple[float, float]]] = {"nanogpt": [], "lmforge_loop": [], "lmforge": []}
    with tempfile.TemporaryDirectory() as tmp:
        tokens_path = Path(tmp) / "train.bin"
        make_tokens(tokens_path)
        for r in range(args.rounds):
            runs["nanogpt"].append(
                run_nanogpt(args.nanogpt_dir, tokens_path, args.warmup, args.steps)
            )
            torch.manual_seed(0)
            ng = nanogpt_model(args.nanogpt_dir)
            runs["lmforge_loop"].append(
                run_lmforge(ng, nanogpt_loss, tokens_path, args.warmup, args.steps)
            )
            torch.manual_seed(0)
            runs["lmforge"].append(
                run_lmforge(our_model(), lm_loss, tokens_path, args.warmup, args.steps)
            )
            shown = "  ".join(
                f"{k} {v[-1][0]:,.0f} tok/s ({v[-1][1]:,.0f}/CPU s)" for k, v in runs.items()
            )
            print(f"round {r + 1}: {shown}", flush=True)
    med = {k: [statistics.median(x[i] for x in v) for i in (0, 1)] for k, v in runs.items()}
    result: dict[str, object] = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    for name, (wall, cpu) in med.items():
        result[f"{name}_tokens_per_s"] = round(wall)
        result[f"{name}_tokens_per_cpu_s"] = round(cpu)
    base = med["nanogpt"]
    # lmforge (our model + our loop) vs nanoGPT; and our loop alone (nanoGPT's model in it)
    result["ratio"] = round(med["lmforge"][0] / base[0], 3)
    result["ratio_cpu"] = round(med["lmforge"][1] / base[1], 3)
    result["loop_ratio"] = round(med["lmforge_loop"][0] / base[0], 3)
    result["loop_ratio_cpu"] = round(med["lmforge_loop"][1] / base[1], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
