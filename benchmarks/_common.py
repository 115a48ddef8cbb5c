"""Pieces the training benchmarks share (bench_train_cpu.py, bench_train_gpu.py).

A token file, nanoGPT's model.py imported from a directory (never vendored here), a transcription
of nanoGPT's train.py iteration, and lmforge's real training loop timed after its warmup steps.
On CUDA every timer starts and stops after torch.cuda.synchronize(), so queued GPU work is counted
where it runs.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from lmforge.artifacts import StageContext
from lmforge.common.logging import MetricsWriter
from lmforge.train.config import TrainConfig
from lmforge.train.loader import TokenWindows
from lmforge.train.loop import train

Batch = tuple[torch.Tensor, torch.Tensor]
Stamp = tuple[float, float]  # (perf_counter, process_time)


def write_tokens(path: Path, vocab_size: int, n: int = 1_000_000, seed: int = 0) -> None:
    """A uint16 token file of n random ids below vocab_size (what `lmforge tokenizer encode` writes)."""
    rng = np.random.default_rng(seed)
    rng.integers(0, vocab_size, n, dtype=np.uint16).tofile(path)


def import_nanogpt(nanogpt_dir: Path) -> ModuleType:
    """nanoGPT's model.py as a module (GPT, GPTConfig), from the directory that holds it."""
    if not (Path(nanogpt_dir) / "model.py").is_file():
        sys.exit(
            f"{nanogpt_dir}/model.py not found; get it with: "
            f"git --git-dir <nanoGPT mirror> show HEAD:model.py > {nanogpt_dir}/model.py"
        )
    sys.path.insert(0, str(nanogpt_dir))
    import model  # nanoGPT's model.py

    return model


def nanogpt_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """lmforge loss_fn for nanoGPT's model, which computes its loss itself when given targets."""
    return model(batch["input_ids"], batch["labels"].contiguous())[1], {}


def stamp(device: torch.device) -> Stamp:
    """(wall, CPU) clock readings once the device has finished all queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter(), time.process_time()


def rates(tokens: int, start: Stamp, end: Stamp) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second) between two stamps."""
    return tokens / (end[0] - start[0]), tokens / (end[1] - start[1])


class _Clock:
    """Wraps a loader; stamps the clock when the first timed step fetches its batch."""

    def __init__(self, loader: TokenWindows, warmup: int, device: torch.device) -> None:
        self.loader, self.warmup, self.device = loader, warmup, device
        self.t0: Stamp | None = None

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self.loader.position == self.warmup:
            self.t0 = stamp(self.device)
        return next(self.loader)


def time_lmforge(
    model: torch.nn.Module,
    loss_fn: Callable,
    tokens_path: Path,
    tc: TrainConfig,
    warmup: int,
    flops_per_token: float | None = None,
) -> tuple[float, float]:
    """Rates of `lmforge.train.loop.train()` over steps warmup..tc.max_steps, as pretrain runs it.

    The loop is the real one: TokenWindows loader, device/dtype/compile from `tc`, fused AdamW,
    clipping, metrics.jsonl and the progress bar. It may be called again on the same model.
    """
    device = torch.device("cuda" if tc.device == "cuda" else "cpu")
    tokens = np.memmap(tokens_path, dtype=np.uint16, mode="r")
    loader = _Clock(
        TokenWindows(tokens, tc.seq_len, tc.micro_batch_size, seed=tc.seed), warmup, device
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        ctx = StageContext(out, "bench", logging.getLogger("bench"), MetricsWriter(out / "m.jsonl"))
        train(model, loss_fn, loader, tc, ctx, flops_per_token=flops_per_token, resume=False)
        end = stamp(device)
        ctx.metrics.close()
    return rates((tc.max_steps - warmup) * tc.micro_batch_size * tc.seq_len, loader.t0, end)


def nanogpt_get_batch(
    tokens_path: Path, block: int, batch: int, device: torch.device
) -> Callable[[], Batch]:
    """nanoGPT's train.py get_batch: memmap reopened per batch, pinned + non_blocking on CUDA."""

    def get_batch() -> Batch:
        data = np.memmap(tokens_path, dtype=np.uint16, mode="r")  # recreated: avoids a leak
        ix = torch.randint(len(data) - block, (batch,))
        x = torch.stack([torch.from_numpy(data[i : i + block].astype(np.int64)) for i in ix])
        y = torch.stack(
            [torch.from_numpy(data[i + 1 : i + 1 + block].astype(np.int64)) for i in ix]
        )
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(
                device, non_blocking=True
            )
        return x, y

    return get_batch


def time_nanogpt_loop(
    model: torch.nn.Module,
    loss_of: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    get_batch: Callable[[], Batch],
    warmup: int,
    steps: int,
    *,
    lr: float,
    amp_dtype: torch.dtype | None = None,
    device: torch.device = torch.device("cpu"),
) -> tuple[float, float]:
    """Rates of nanoGPT's train.py iteration (grad accumulation 1, log_interval 1) after warmup.

    Per step: set lr, forward under autocast, prefetch the next batch, backward, clip 1.0,
    optimizer step, zero_grad(set_to_none=True), loss.item(). `loss_of(model, x, y)` is the
    forward that returns the loss (nanoGPT's model(x, y)[1], or another model's equivalent).
    """
    autocast = (
        torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    )
    x, y = get_batch()
    t0 = stamp(device)
    for it in range(warmup + steps):
        if it == warmup:
            t0 = stamp(device)
        for group in optimizer.param_groups:  # get_lr + set (constant: lmforge runs warmup=0)
            group["lr"] = lr
        with autocast:
            loss = loss_of(model, x, y)
        x, y = get_batch()  # async prefetch while the GPU runs the forward
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # log_interval=1, train.py's default
    return rates(steps * x.numel(), t0, stamp(device))
