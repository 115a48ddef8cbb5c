"""The one training loop, shared by pretraining, fine-tuning, alignment and distillation.

Callers differ only in their batches, which parameters train, and their
`loss_fn(model, batch) -> (loss, metrics)`. The loop owns everything else: device and
distributed setup, gradient accumulation, clipping, the LR schedule, NaN/inf skipping, eval and
checkpoint cadence, early stopping, metrics.jsonl, the progress bar, and exact resume from the
newest checkpoint in `<out>/checkpoints/`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.errors import StageError
from lmforge.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from lmforge.train.config import TrainConfig
from lmforge.train.distributed import (
    Runtime,
    full_model_state,
    mean_across_ranks,
    no_sync,
    prepare_model,
    setup_runtime,
)
from lmforge.train.distributed import unwrap as unwrap_model
from lmforge.train.optim import ParamGroups, build_optimizer, set_lr

Batch = dict[str, torch.Tensor]
# loss_fn(model, batch) -> (loss, metrics); tensor metrics are read once per step, not per batch
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, float | torch.Tensor]]]
EvalFn = Callable[[nn.Module], dict[str, float]]

# The run's time estimate is announced once this much training has been timed, if the stage still
# has at least ETA_MIN_LEFT_S to go (short fine-tunes stay quiet).
ETA_AFTER_S, ETA_MIN_LEFT_S = 10.0, 20.0

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
class LoopState:
    """The loop's counters; saved in every checkpoint so a resumed run continues exactly."""

    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    bad_steps_in_a_row: int = 0
    skipped_steps: int = 0
    last_loss: float | None = None
    last_val_loss: float | None = None
    scaler: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    """What a caller needs after training: the trained model and the headline numbers."""

    model: nn.Module
    state_dict: dict[str, torch.Tensor]
    step: int
    tokens_seen: int
    train_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    tokens_per_s: float
    skipped_steps: int
    stopped_early: bool
    resumed_from: int | None


def train(
    model: nn.Module,
    loss_fn: LossFn,
    loader: Iterator[Batch],
    cfg: TrainConfig,
    ctx: Any,
    *,
    eval_fn: EvalFn | None = None,
    param_groups: ParamGroups | None = None,
    flops_per_token: float | None = None,
    resume: bool = True,
) -> TrainResult:
    """Trains `model` for cfg.max_steps optimizer steps; see the module docstring.

    Args:
        model: the module; moved to the device and wrapped (DDP/FSDP) here.
        loss_fn: (model, batch) -> (scalar loss, extra float metrics to log).
        loader: an iterator of dict batches; its state_dict()/load_state_dict() (if any) is
            checkpointed so a resumed run sees the same batches.
        cfg: the train section.
        ctx: the StageContext (out, metrics, progress).
        eval_fn: model -> {"val_loss": ..., ...} averaged over this rank's val batches.
        param_groups: optimizer groups (default: every trainable parameter, decay split).
        flops_per_token: training FLOPs per token, for MFU on GPUs with a known peak.
        resume: continue from the newest checkpoint in ctx.out/checkpoints when there is one.
    """
    rt = setup_runtime(cfg)
    model = prepare_model(model, cfg, rt)
    optimizer = build_optimizer(unwrap_model(model), cfg, param_groups)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    accum = cfg.accum_steps(rt.env.world_size)
    ckpt_root = Path(ctx.out) / "checkpoints"
    state, resumed_from = LoopState(), None
    if resume and (latest := latest_checkpoint(ckpt_root)) is not None:
        saved = load_checkpoint(latest, model, optimizer, loader=loader)
        state = LoopState(**saved["loop"])
        resumed_from = state.step
        if state.scaler:
            scaler.load_state_dict(state.scaler)
        if rt.env.is_main:
            _truncate_metrics(ctx.metrics, after_step=state.step)
        ctx.log.info("resumed from %s (step %d)", latest, state.step)

    peak = _peak_flops(rt)
    stopped_early = False
    window_tokens, window_t0 = 0, time.perf_counter()
    run_tokens, run_t0, first_step = 0, time.perf_counter(), state.step
    eval_s = 0.0  # evaluations before the ETA: not training pace (projected_left_s adds them)
    eta_announced = False
    with ctx.progress("train", total=cfg.max_steps, unit="step") as bar:
        bar.advance(state.step)
        while state.step < cfg.max_steps:
            lr = cfg.lr * set_lr(optimizer, state.step, cfg)
            model.train()
            loss_t, extra_t, n_tokens = _accumulate(model, loss_fn, loader, accum, rt, scaler)
            n_tokens *= rt.env.world_size
            norm_t = _clip(model, optimizer, scaler, cfg.grad_clip)
            # The step's one host sync: the skip decision needs loss and norm on the CPU, and the
            # loss_fn's metrics come along in the same copy.
            synced = [mean_across_ranks(loss_t), norm_t, *extra_t.values()]
            loss, grad_norm, *values = torch.stack(
                [torch.as_tensor(v, device=rt.device).double() for v in synced]
            ).tolist()
            extra = dict(zip(extra_t, values, strict=True))
            fp16_overflow = scaler.is_enabled() and not math.isfinite(grad_norm)
            if not math.isfinite(loss) or (not math.isfinite(grad_norm) and not fp16_overflow):
                optimizer.zero_grad(set_to_none=True)
                state.skipped_steps += 1
                state.bad_steps_in_a_row += 1
                ctx.log.warning(
                    "step %d: loss %s, grad norm %s: step skipped", state.step, loss, grad_norm
                )
                if state.bad_steps_in_a_row >= cfg.max_bad_steps:
                    raise StageError(
                        f"loss was NaN/inf for {state.bad_steps_in_a_row} steps in a row "
                        f"(step {state.step}, lr {lr:.3g}); lower train.lr, set train.grad_clip, "
                        "or check the data; raise train.max_bad_steps to tolerate more"
                    )
            else:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                state.bad_steps_in_a_row = 0
                state.last_loss = loss
            state.step += 1
            state.tokens_seen += n_tokens
            window_tokens += n_tokens
            run_tokens += n_tokens
            bar.advance(1)

            if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
                elapsed = max(time.perf_counter() - window_t0, 1e-9)
                row = {
                    "step": state.step,
                    "loss": loss,
                    "lr": lr,
                    "tokens_seen": state.tokens_seen,
                    "tokens_per_s": window_tokens / elapsed,
                    "grad_norm": grad_norm,
                    **extra,
                }
                if peak and flops_per_token:
                    row["mfu"] = flops_per_token * row["tokens_per_s"] / (peak * rt.env.world_size)
                ctx.metrics.log(**row)
                shown = {"mfu": f"{row['mfu']:.1%}"} if "mfu" in row else {}
                bar.update(loss=loss, lr=lr, tok_s=round(row["tokens_per_s"]), **shown)
                window_tokens, window_t0 = 0, time.perf_counter()

            if not eta_announced and (spent := time.perf_counter() - run_t0) >= ETA_AFTER_S:
                eta_announced = True
                step_s = (spent - eval_s) / (state.step - first_step)
                left = projected_left_s(step_s, state.step, cfg, accum, eval_fn is not None)
                if left >= ETA_MIN_LEFT_S and rt.env.is_main:
                    ctx.announce_eta(left, _speed(run_tokens / spent, rt))
            done = state.step == cfg.max_steps
            evaluated = None
            if eval_fn is not None and (
                done or (cfg.eval_every and state.step % cfg.eval_every == 0)
            ):
                eval_t0 = time.perf_counter()
                evaluated = _evaluate(model, eval_fn, rt)
                eval_s += time.perf_counter() - eval_t0
                val_loss = state.last_val_loss = evaluated["val_loss"]
                ctx.metrics.log(step=state.step, tokens_seen=state.tokens_seen, **evaluated)
                stopped_early = _update_early_stop(state, val_loss, cfg)
                if ctx.on_eval is not None:
                    ctx.on_eval(state.step, evaluated)  # e.g. tune's pruning; may raise to stop
                window_t0 = time.perf_counter()  # eval time is not training throughput
            if cfg.ckpt_every and (done or stopped_early or state.step % cfg.ckpt_every == 0):
                state.scaler = scaler.state_dict() if scaler.is_enabled() else {}
                save_checkpoint(
                    ckpt_root, state.step, model, optimizer, loader=loader,
                    loop_state=asdict(state), keep_last=cfg.keep_last, keep_best=cfg.keep_best,
                    val_loss=evaluated["val_loss"] if evaluated else None,
                )  # fmt: skip
                window_t0 = time.perf_counter()
            if stopped_early:
                ctx.log.info("early stop at step %d: no val improvement in %d evals",
                             state.step, cfg.early_stop_patience)  # fmt: skip
                break

    run_elapsed = max(time.perf_counter() - run_t0, 1e-9)
    return TrainResult(
        model=unwrap_model(model),
        state_dict=full_model_state(model),  # a collective under FSDP: complete on rank 0
        step=state.step,
        tokens_seen=state.tokens_seen,
        train_loss=state.last_loss,
        val_loss=state.last_val_loss,
        best_val_loss=state.best_val_loss,
        tokens_per_s=run_tokens / run_elapsed,
        skipped_steps=state.skipped_steps,
        stopped_early=stopped_early,
        resumed_from=resumed_from,
    )


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


def _speed(tokens_per_s: float, rt: Runtime) -> str:
    """'10,250 tokens/s on 2 CPU threads' / '... on NVIDIA H100': the rate and what gave it."""
    if rt.device.type == "cuda":
        where = torch.cuda.get_device_name(rt.device)
    else:
        where = f"{torch.get_num_threads()} CPU threads"
    return f"{tokens_per_s:,.0f} tokens/s on {where}"


def _autocast(rt: Runtime) -> contextlib.AbstractContextManager:
    if rt.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(rt.device.type, dtype=rt.amp_dtype)


def _to_device(batch: Batch, device: torch.device) -> Batch:
    """Copies a batch to the device; on CUDA through pinned memory, so the copy is asynchronous."""
    if device.type != "cuda":
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return {
        k: v.pin_memory().to(device, non_blocking=True) if torch.is_tensor(v) else v
        for k, v in batch.items()
    }


def _accumulate(
    model: nn.Module, loss_fn: LossFn, loader: Iterator[Batch], accum: int, rt: Runtime, scaler: Any
) -> tuple[torch.Tensor, dict[str, Any], int]:
    """Forward/backward over `accum` micro-batches; returns mean loss, mean metrics, tokens.

    The loss (and any tensor metric) stays on the device: reading it here would stall the GPU
    once per micro-batch.
    """
    total = torch.zeros((), device=rt.device)
    extra: dict[str, Any] = {}
    n_tokens = 0
    for micro in range(accum):
        batch = _to_device(next(loader), rt.device)
        n_tokens += int(batch["input_ids"].numel()) if "input_ids" in batch else 0
        with no_sync(model, skip_sync=micro < accum - 1):  # DDP: forward and backward inside
            with _autocast(rt):
                loss, metrics = loss_fn(model, batch)
            scaler.scale(loss / accum).backward()
        total += loss.detach().float()
        for key, value in metrics.items():
            value = value.detach().float() if torch.is_tensor(value) else float(value)
            extra[key] = extra.get(key, 0.0) + value / accum
    return total / accum, extra, n_tokens


def _clip(
    model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, max_norm: float
) -> torch.Tensor:
    """Unscales (fp16) and clips gradients; returns the global grad norm before clipping."""
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return norm


@torch.no_grad()
def _evaluate(model: nn.Module, eval_fn: EvalFn, rt: Runtime) -> dict[str, float]:
    """Runs eval_fn in eval mode; averages over ranks; adds perplexity."""
    model.eval()
    with _autocast(rt):
        result = {
            k: float(mean_across_ranks(torch.tensor(float(v), device=rt.device)))
            for k, v in eval_fn(model).items()
        }
    model.train()
    result["val_ppl"] = math.exp(min(result["val_loss"], 50.0))
    return result


def _update_early_stop(state: LoopState, val_loss: float, cfg: TrainConfig) -> bool:
    """Tracks the best val loss; True when patience has run out."""
    if state.best_val_loss is None or val_loss < state.best_val_loss:
        state.best_val_loss, state.best_step = val_loss, state.step
        state.evals_without_improvement = 0
        return False
    state.evals_without_improvement += 1
    return (
        bool(cfg.early_stop_patience) and state.evals_without_improvement >= cfg.early_stop_patience
    )


def _peak_flops(rt: Runtime) -> float | None:
    if rt.device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(rt.device))


def _truncate_metrics(writer: Any, after_step: int) -> None:
    """Drops metrics rows a killed run wrote after its last checkpoint (they will be redone)."""
    import json

    path = Path(getattr(writer, "path", ""))
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line
        if row.get("step", 0) <= after_step:
            keep.append(line)
    path.write_text("".join(f"{line}\n" for line in keep), encoding="utf-8")
