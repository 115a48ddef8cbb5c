"""Optimizers and learning-rate schedules for the one training loop.

`build_optimizer(model, cfg)` looks the optimizer up in a small registry (adamw, lamb, muon) and
splits parameters so that weight decay never touches norms, biases or embeddings. `lr_at(step, cfg)`
is the schedule as a plain function of the step, so resuming needs no scheduler object: the step
number alone restores it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.train.config import TrainConfig

ParamGroups = list[dict[str, Any]]


# --------------------------------------------------------------------------- parameter groups


def _no_decay_ids(model: nn.Module) -> set[int]:
    """Ids of parameters that must not decay: embeddings, and anything under 2-D (norms, biases)."""
    ids = {id(p) for p in model.parameters() if p.ndim < 2}
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            ids.update(id(p) for p in module.parameters())
    return ids


def decay_groups(model: nn.Module, weight_decay: float) -> ParamGroups:
    """Two groups of trainable parameters: decayed matrices and everything else."""
    skip = _no_decay_ids(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if id(p) not in skip]
    no_decay = [p for p in trainable if id(p) in skip]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _fused_ok(groups: ParamGroups) -> bool:
    """Fused AdamW runs on CUDA (and CPU on recent torch) for floating-point parameters."""
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_floating_point() for p in params)


# --------------------------------------------------------------------------- LAMB


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019): Adam's update scaled per tensor by ||w|| / ||update||.

    The trust ratio lets very large batches use one learning rate for every layer.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(
            params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"].item()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                update = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                w_norm, u_norm = p.norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0)
                p.add_(update * trust, alpha=-group["lr"])
        return loss


# --------------------------------------------------------------------------- Muon + AdamW


class OptimizerList(torch.optim.Optimizer):
    """Several optimizers stepped as one (Muon on matrices, AdamW on the rest).

    Subclasses Optimizer only for its type; `param_groups` and `state` are the union of the parts,
    so the loop sets learning rates and clips without knowing there is more than one.
    """

    def __init__(self, parts: list[torch.optim.Optimizer]) -> None:  # no super().__init__: a view
        self.parts = parts
        self.defaults = {}

    @property
    def param_groups(self) -> ParamGroups:  # type: ignore[override]
        return [g for opt in self.parts for g in opt.param_groups]

    @property
    def state(self) -> dict:  # type: ignore[override]
        return {k: v for opt in self.parts for k, v in opt.state.items()}

    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        for opt in self.parts:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:  # type: ignore[override]
        return {"parts": [opt.state_dict() for opt in self.parts]}

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        for opt, sd in zip(self.parts, state_dict["parts"], strict=True):
            opt.load_state_dict(sd)


def _muon_params(model: nn.Module) -> set[int]:
    """Hidden 2-D matrices: not embeddings and not the output head (`model.lm_head`)."""
    skip = _no_decay_ids(model)
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Module):
        skip.update(id(p) for p in head.parameters())
    return {
        id(p) for p in model.parameters() if p.requires_grad and p.ndim == 2 and id(p) not in skip
    }


# --------------------------------------------------------------------------- registry


def _make(cls: type, groups: ParamGroups, cfg: TrainConfig, **kwargs: Any) -> torch.optim.Optimizer:
    """cls(groups, **kwargs), or its ZeRO-1 sharded form when train.zero1 under torchrun."""
    if cfg.zero1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        from lmforge.train.distributed import zero1_optimizer

        return zero1_optimizer(groups, cls, **kwargs)
    return cls(groups, **kwargs)


def _adamw(groups: ParamGroups, cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    fused = _fused_ok(groups)
    return _make(torch.optim.AdamW, groups, cfg, lr=cfg.lr, betas=cfg.betas, fused=fused or None)


def _lamb(groups: ParamGroups, cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    return _make(Lamb, groups, cfg, lr=cfg.lr, betas=cfg.betas)


def _muon(groups: ParamGroups, cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    muon_cls = getattr(torch.optim, "Muon", None)
    if muon_cls is None:
        raise ConfigError(
            f"train.optimizer=muon needs torch.optim.Muon (torch>=2.9); this torch is "
            f"{torch.__version__}: upgrade torch or set train.optimizer=adamw"
        )
    if cfg.zero1:
        raise ConfigError("train.zero1 works with adamw or lamb, not muon; unset train.zero1")
    matrices = _muon_params(model)
    muon_params = [p for g in groups for p in g["params"] if id(p) in matrices]
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in matrices]} for g in groups]
    rest = [g for g in rest if g["params"]]
    parts: list[torch.optim.Optimizer] = []
    if muon_params:
        muon = muon_cls(
            muon_params,
            lr=cfg.muon_lr,
            weight_decay=cfg.weight_decay,
            adjust_lr_fn="match_rms_adamw",
        )
        parts.append(muon)
    if rest:
        parts.append(_adamw(rest, cfg, model))
    return OptimizerList(parts)


OPTIMIZERS: dict[str, Callable[[ParamGroups, TrainConfig, nn.Module], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "lamb": _lamb,
    "muon": _muon,
}


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, param_groups: ParamGroups | None = None
) -> torch.optim.Optimizer:
    """The optimizer named by `cfg.optimizer` over `param_groups` (default: decay/no-decay split).

    Every group remembers its peak lr as `base_lr`, which `set_lr` scales by the schedule.
    """
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(
            f"train.optimizer={cfg.optimizer!r} is unknown; valid: {', '.join(sorted(OPTIMIZERS))}"
        )
    groups = param_groups if param_groups is not None else decay_groups(model, cfg.weight_decay)
    optimizer = OPTIMIZERS[cfg.optimizer](groups, cfg, model)
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
    return optimizer


# --------------------------------------------------------------------------- schedules


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warmup, then the chosen shape."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_ratio * cfg.max_steps))
        decay_start = max(cfg.warmup_steps, cfg.max_steps - decay_steps)
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(1, cfg.max_steps - decay_start)
        return 1.0 - (1.0 - floor) * min(1.0, progress)
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, progress)
    if cfg.schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate at `step` for a group whose peak is `cfg.lr`."""
    return cfg.lr * lr_factor(step, cfg)


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> float:
    """Apply the schedule to every group (each scaled from its own `base_lr`); returns the factor."""
    factor = lr_factor(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return factor
