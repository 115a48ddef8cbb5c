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
from lmforge.model.moe import MoE, moe_layers, routing_metrics
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
from lmforge.train.pace import Pace, peak_flops, projected_left_s, speed

Batch = dict[str, torch.Tensor]
# loss_fn(model, batch) -> (loss, metrics); tensor metrics are read once per step, not per batch
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, float | torch.Tensor]]]
EvalFn = Callable[[nn.Module], dict[str, float]]

# The run's time estimate is announced once this much training has been timed, if the stage still
# has at least ETA_MIN_LEFT_S to go (short fine-tunes stay quiet).
ETA_AFTER_S, ETA_MIN_LEFT_S = 10.0, 20.0


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


@dataclass
class _Parts:
    """What setup builds once and every step uses: the wrapped model and what updates it."""

    rt: Runtime
    model: nn.Module  # moved to the device, wrapped (DDP/FSDP) and compiled as cfg asks
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # a no-op unless the run autocasts to fp16
    accum: int  # micro-batches per optimizer step on each rank
    moe: list[MoE]  # the model's mixture-of-experts layers, found once (empty when dense)


@dataclass
class _StepResult:
    """One optimizer step's numbers, on the host."""

    lr: float
    loss: float
    grad_norm: float
    extra: dict[str, float]
    n_tokens: int  # across all ranks


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
    perplexity: bool = True,
    runtime: Runtime | None = None,
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
        perplexity: log val_ppl = exp(val_loss); False where val_loss is no token NLL (align).
        runtime: setup_runtime(cfg) when the caller has already made it (default: made here).
    """
    parts = _setup(model, cfg, param_groups, runtime)
    ckpt_root = Path(ctx.out) / "checkpoints"
    state, resumed_from = LoopState(), None
    if resume and (latest := latest_checkpoint(ckpt_root)) is not None:
        state = _resume(latest, parts, loader, ctx)
        resumed_from = state.step
    peak = _peak_flops(parts.rt)
    pace = Pace(first_step=state.step)
    stopped_early = False
    with ctx.progress("train", total=cfg.max_steps, unit="step") as bar:
        bar.advance(state.step)
        while state.step < cfg.max_steps:
            step = _step(parts, loss_fn, loader, cfg, state, ctx.log)
            pace.count(step.n_tokens)
            bar.advance(1)
            if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
                _log_step(ctx, bar, state, step, pace, flops_per_token, peak, parts.rt)
                pace.restart_window()
            _announce_eta_once(ctx, pace, state, cfg, parts, evaluates=eval_fn is not None)
            done = state.step == cfg.max_steps
            evaluated = None
            if eval_fn is not None and (
                done or (cfg.eval_every and state.step % cfg.eval_every == 0)
            ):
                evaluated = _evaluate_and_track(parts, eval_fn, state, ctx, pace, perplexity)
                stopped_early = _update_early_stop(state, evaluated["val_loss"], cfg)
                if ctx.on_eval is not None:
                    ctx.on_eval(state.step, evaluated)  # e.g. tune's pruning; may raise to stop
                pace.restart_window()  # eval time is not training throughput
            if cfg.ckpt_every and (done or stopped_early or state.step % cfg.ckpt_every == 0):
                val_loss = evaluated["val_loss"] if evaluated else None
                _checkpoint(ckpt_root, parts, loader, state, cfg, val_loss)
                pace.restart_window()
            if stopped_early:
                ctx.log.info("early stop at step %d: no val improvement in %d evals",
                             state.step, cfg.early_stop_patience)  # fmt: skip
                break
    return _result(parts, state, pace, stopped_early, resumed_from)


def _setup(
    model: nn.Module, cfg: TrainConfig, param_groups: ParamGroups | None, rt: Runtime | None
) -> _Parts:
    """Device, distributed wrapping and compile, the optimizer and the fp16 loss scaler."""
    rt = rt if rt is not None else setup_runtime(cfg)
    model = prepare_model(model, cfg, rt)
    optimizer = build_optimizer(unwrap_model(model), cfg, param_groups)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    accum = cfg.accum_steps(rt.env.world_size)
    return _Parts(rt, model, optimizer, scaler, accum, moe_layers(model))


def _resume(path: Path, parts: _Parts, loader: Any, ctx: Any) -> LoopState:
    """Restores model, optimizer, scaler and loader from `path`; returns its loop counters.

    The metrics rows a killed run wrote after that checkpoint are dropped: they will be redone.
    """
    saved = load_checkpoint(path, parts.model, parts.optimizer, loader=loader)
    state = LoopState(**saved["loop"])
    if state.scaler:
        parts.scaler.load_state_dict(state.scaler)
    if parts.rt.env.is_main:
        _truncate_metrics(ctx.metrics, after_step=state.step)
    ctx.log.info("resumed from %s (step %d)", path, state.step)
    return state


def _step(
    parts: _Parts, loss_fn: LossFn, loader: Iterator[Batch], cfg: TrainConfig, state: LoopState,
    log: Any,
) -> _StepResult:  # fmt: skip
    """One optimizer step: micro-batches, clipping, one host sync, then the update or a skip."""
    lr = cfg.lr * set_lr(parts.optimizer, state.step, cfg)
    parts.model.train()
    loss_t, extra_t, n_tokens = _accumulate(parts, loss_fn, loader)
    n_tokens *= parts.rt.env.world_size
    norm_t = _clip(parts.model, parts.optimizer, parts.scaler, cfg.grad_clip)
    # The step's one host sync: the skip decision needs loss and norm on the CPU, and the
    # loss_fn's metrics come along in the same copy.
    synced = [mean_across_ranks(loss_t), norm_t, *extra_t.values()]
    loss, grad_norm, *values = torch.stack(
        [torch.as_tensor(v, device=parts.rt.device).double() for v in synced]
    ).tolist()
    fp16_overflow = parts.scaler.is_enabled() and not math.isfinite(grad_norm)
    if not math.isfinite(loss) or (not math.isfinite(grad_norm) and not fp16_overflow):
        _skip_bad_step(parts.optimizer, state, cfg, log, loss=loss, grad_norm=grad_norm, lr=lr)
    else:  # on an fp16 overflow the scaler skips the update itself and lowers its scale
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        parts.optimizer.zero_grad(set_to_none=True)
        state.bad_steps_in_a_row = 0
        state.last_loss = loss
    state.step += 1
    state.tokens_seen += n_tokens
    return _StepResult(lr, loss, grad_norm, dict(zip(extra_t, values, strict=True)), n_tokens)


def _skip_bad_step(
    optimizer: torch.optim.Optimizer, state: LoopState, cfg: TrainConfig, log: Any, *,
    loss: float, grad_norm: float, lr: float,
) -> None:  # fmt: skip
    """Drops a NaN/inf step's gradients; raises once cfg.max_bad_steps come in a row."""
    optimizer.zero_grad(set_to_none=True)
    state.skipped_steps += 1
    state.bad_steps_in_a_row += 1
    log.warning("step %d: loss %s, grad norm %s: step skipped", state.step, loss, grad_norm)
    if state.bad_steps_in_a_row >= cfg.max_bad_steps:
        raise StageError(
            f"loss was NaN/inf for {state.bad_steps_in_a_row} steps in a row "
            f"(step {state.step}, lr {lr:.3g}); lower train.lr, set train.grad_clip, "
            "or check the data; raise train.max_bad_steps to tolerate more"
        )


def _log_step(
    ctx: Any, bar: Any, state: LoopState, step: _StepResult, pace: Pace,
    flops_per_token: float | None, peak: float | None, rt: Runtime,
) -> None:  # fmt: skip
    """A metrics.jsonl row and the progress bar's numbers, at the log window's throughput."""
    row = {
        "step": state.step,
        "loss": step.loss,
        "lr": step.lr,
        "tokens_seen": state.tokens_seen,
        "tokens_per_s": pace.window_tokens_per_s(),
        "grad_norm": step.grad_norm,
        **step.extra,
    }
    if peak and flops_per_token:
        row["mfu"] = flops_per_token * row["tokens_per_s"] / (peak * rt.env.world_size)
    ctx.metrics.log(**row)
    shown = {"mfu": f"{row['mfu']:.1%}"} if "mfu" in row else {}
    bar.update(loss=step.loss, lr=step.lr, tok_s=round(row["tokens_per_s"]), **shown)


def _announce_eta_once(
    ctx: Any, pace: Pace, state: LoopState, cfg: TrainConfig, parts: _Parts, evaluates: bool
) -> None:
    """Once ETA_AFTER_S of the run have passed, tells ctx the time left if it is ETA_MIN_LEFT_S
    or more."""
    if pace.eta_announced or (spent := time.perf_counter() - pace.run_t0) < ETA_AFTER_S:
        return
    pace.eta_announced = True
    step_s = (spent - pace.eval_s) / (state.step - pace.first_step)
    left = projected_left_s(step_s, state.step, cfg, parts.accum, evaluates)
    if left >= ETA_MIN_LEFT_S and parts.rt.env.is_main:
        ctx.announce_eta(left, speed(pace.run_tokens / spent, parts.rt))


def _evaluate_and_track(
    parts: _Parts, eval_fn: EvalFn, state: LoopState, ctx: Any, pace: Pace, perplexity: bool
) -> dict[str, float]:
    """Evaluates, logs the metrics row and records the val loss; the time goes to pace.eval_s."""
    eval_t0 = time.perf_counter()
    evaluated = _evaluate(parts.model, eval_fn, parts.rt, perplexity)
    pace.eval_s += time.perf_counter() - eval_t0
    state.last_val_loss = evaluated["val_loss"]
    ctx.metrics.log(step=state.step, tokens_seen=state.tokens_seen, **evaluated)
    return evaluated


def _checkpoint(
    root: Path, parts: _Parts, loader: Any, state: LoopState, cfg: TrainConfig,
    val_loss: float | None,
) -> None:  # fmt: skip
    """Saves everything exact resume needs: weights, optimizer, loader, counters, scaler."""
    state.scaler = parts.scaler.state_dict() if parts.scaler.is_enabled() else {}
    save_checkpoint(
        root, state.step, parts.model, parts.optimizer, loader=loader, loop_state=asdict(state),
        keep_last=cfg.keep_last, keep_best=cfg.keep_best, val_loss=val_loss,
    )  # fmt: skip


def _result(
    parts: _Parts, state: LoopState, pace: Pace, stopped_early: bool, resumed_from: int | None
) -> TrainResult:
    """The trained model (unwrapped), its full state dict and the run's headline numbers."""
    tokens_per_s = pace.run_tokens_per_s()  # read first: gathering the state dict is not training
    return TrainResult(
        model=unwrap_model(parts.model),
        state_dict=full_model_state(parts.model),  # a collective under FSDP: complete on rank 0
        step=state.step,
        tokens_seen=state.tokens_seen,
        train_loss=state.last_loss,
        val_loss=state.last_val_loss,
        best_val_loss=state.best_val_loss,
        tokens_per_s=tokens_per_s,
        skipped_steps=state.skipped_steps,
        stopped_early=stopped_early,
        resumed_from=resumed_from,
    )


def autocast(rt: Runtime | None) -> contextlib.AbstractContextManager:
    """The loop's autocast: train.dtype on the run's device (none for fp32, or without a runtime).
    Public for what scores rows the loss will see (PPO/GRPO rollouts) in the loss's numerics."""
    if rt is None or rt.amp_dtype is None:
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
    parts: _Parts, loss_fn: LossFn, loader: Iterator[Batch]
) -> tuple[torch.Tensor, dict[str, Any], int]:
    """Forward/backward over parts.accum micro-batches; returns mean loss, mean metrics, tokens.

    The loss (and any tensor metric) stays on the device: reading it here would stall the GPU
    once per micro-batch.
    """
    model, accum, rt = parts.model, parts.accum, parts.rt
    total = torch.zeros((), device=rt.device)
    extra: dict[str, Any] = {}
    n_tokens = 0
    for micro in range(accum):
        batch = _to_device(next(loader), rt.device)
        n_tokens += int(batch["input_ids"].numel()) if "input_ids" in batch else 0
        with no_sync(model, skip_sync=micro < accum - 1):  # DDP: forward and backward inside
            with autocast(rt):
                loss, metrics = loss_fn(model, batch)
            metrics = {**metrics, **routing_metrics(parts.moe)}  # a mixture of experts' balance
            parts.scaler.scale(loss / accum).backward()
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
def _evaluate(model: nn.Module, eval_fn: EvalFn, rt: Runtime, perplexity: bool) -> dict[str, float]:
    """Runs eval_fn in eval mode; averages over ranks; adds perplexity if asked."""
    model.eval()
    with autocast(rt):
        result = {
            k: float(mean_across_ranks(torch.tensor(float(v), device=rt.device)))
            for k, v in eval_fn(model).items()
        }
    model.train()
    if perplexity:
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
    """Drops metrics rows a killed run wrote after its last checkpoint (they will be redone).
    Rewritten atomically (a crash here keeps the old rows), with the writer's handle closed first
    so its next row opens the new file rather than the replaced one."""
    import json

    from lmforge.common.io import atomic_write_text

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
    if hasattr(writer, "close"):
        writer.close()
    atomic_write_text(path, "".join(f"{line}\n" for line in keep))
