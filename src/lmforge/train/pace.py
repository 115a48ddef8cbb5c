"""The training loop's clock: throughput, MFU against a GPU's peak, and the time left.

The loop (train.loop) counts tokens into a Pace each step; metrics rows report the log window's
tokens/s, MFU divides that by the GPU's dense peak, and the stage's ETA projects the measured step
time over the steps and evaluations still to come.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from lmforge.train.config import TrainConfig
from lmforge.train.distributed import Runtime

# Dense bf16 peak FLOP/s (vendor datasheets) by a part of the GPU's name, for MFU; the longest
# matching key wins, so "H100 PCIe" is not read as the SXM part, nor an L40S as an L4. GPUs not
# listed get no MFU rather than a wrong one.
PEAK_FLOPS = {
    "H100": 989e12,  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
}


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of the GPU called device_name, or None when it is not listed."""
    matches = [k for k in PEAK_FLOPS if k in device_name]
    return PEAK_FLOPS[max(matches, key=len)] if matches else None


@dataclass
class Pace:
    """The loop's wall-clock counters: the log window's tokens, the run's, and the one ETA."""

    first_step: int
    window_tokens: int = 0
    window_t0: float = field(default_factory=time.perf_counter)
    run_tokens: int = 0
    run_t0: float = field(default_factory=time.perf_counter)
    # evaluations before the ETA: not training pace (projected_left_s adds the ones to come)
    eval_s: float = 0.0
    eta_announced: bool = False

    def count(self, n_tokens: int) -> None:
        """Adds a step's tokens to the window and to the run."""
        self.window_tokens += n_tokens
        self.run_tokens += n_tokens

    def restart_window(self) -> None:
        """Starts a new throughput window (after a log row, an evaluation or a checkpoint)."""
        self.window_tokens, self.window_t0 = 0, time.perf_counter()

    def window_tokens_per_s(self) -> float:
        """Throughput since the window started: what a metrics row reports."""
        return self.window_tokens / max(time.perf_counter() - self.window_t0, 1e-9)

    def run_tokens_per_s(self) -> float:
        """Throughput since the loop started, evaluations and checkpoints included."""
        return self.run_tokens / max(time.perf_counter() - self.run_t0, 1e-9)


def projected_left_s(
    step_s: float, step: int, cfg: TrainConfig, accum: int, evaluates: bool
) -> float:
    """Seconds the loop has left after `step`: its training steps at the measured pace, and the
    evaluations still to come, which the first seconds of training never saw.

    An evaluation runs eval_steps forward passes of one micro-batch; a forward pass costs about
    a third of a micro-batch's training (the backward pass costs twice the forward: 6N vs 2N
    FLOPs per token), so an evaluation takes eval_steps / (3 * accum) training steps, accum
    being the micro-batches of a training step on each rank.
    """
    left = (cfg.max_steps - step) * step_s
    if not evaluates:
        return left
    every = cfg.eval_every or cfg.max_steps  # 0: only at the end
    # evaluations at multiples of `every` from this step on (its own comes after this check)
    # and at the last step
    evals = cfg.max_steps // every - (step - 1) // every + (cfg.max_steps % every != 0)
    return left + evals * cfg.eval_steps * step_s / (3 * accum)


def speed(tokens_per_s: float, rt: Runtime) -> str:
    """'10,250 tokens/s on 2 CPU threads' / '... on NVIDIA H100': the rate and what gave it."""
    if rt.device.type == "cuda":
        where = torch.cuda.get_device_name(rt.device)
    else:
        where = f"{torch.get_num_threads()} CPU threads"
    return f"{tokens_per_s:,.0f} tokens/s on {where}"
