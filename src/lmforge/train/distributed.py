"""Distributed training through torchrun: process group, DDP / FSDP2 wrapping, ZeRO-1, state.

The same command runs on one process or many: `torchrun --nproc-per-node N -m lmforge.cli ...`
sets RANK / WORLD_SIZE / LOCAL_RANK and this module turns them into a process group (gloo on CPU,
nccl on GPU) and a wrapped model. No home-made launcher, no home-made all-reduce.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lmforge.errors import ConfigError
from lmforge.train.config import TrainConfig


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job (world_size 1 when not under torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistEnv:
    """Reads the torchrun environment (read when called, never at import)."""
    return DistEnv(
        rank=int(os.environ.get("RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def init_distributed(cfg: TrainConfig, device: torch.device) -> DistEnv:
    """Joins the process group when launched by torchrun; checks the config fits the launch."""
    env = dist_env()
    if not env.enabled:
        return env
    if cfg.distributed == "none":
        raise ConfigError(
            f"launched with WORLD_SIZE={env.world_size} but train.distributed=none; "
            "set train.distributed=ddp or fsdp"
        )
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group(backend=backend)
    return env


@dataclass(frozen=True)
class Runtime:
    """Where the loop runs: device, autocast dtype (None = fp32) and the process's rank."""

    device: torch.device
    amp_dtype: torch.dtype | None
    env: DistEnv


_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Resolves train.device / train.dtype and joins the process group (idempotent)."""
    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise ConfigError("train.device=cuda but no CUDA device is visible; set train.device=cpu")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and cuda)
    env = dist_env()
    device = torch.device("cuda", env.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:  # fp32 matmuls outside autocast (and train.dtype=fp32) run on tensor cores
        torch.set_float32_matmul_precision("high")
    if cfg.dtype == "auto":
        amp = torch.bfloat16 if use_cuda and torch.cuda.is_bf16_supported() else None
    else:
        amp = _AMP[cfg.dtype]
    return Runtime(device=device, amp_dtype=amp, env=init_distributed(cfg, device))


def prepare_model(model: nn.Module, cfg: TrainConfig, rt: Runtime) -> nn.Module:
    """Moves the model to its device, then activation checkpointing, compile, DDP/FSDP."""
    model.to(rt.device)
    if cfg.activation_checkpointing:
        if not hasattr(model, "gradient_checkpointing"):
            raise ConfigError(
                f"train.activation_checkpointing: {type(model).__name__} has no "
                "gradient_checkpointing switch; set train.activation_checkpointing=false"
            )
        model.gradient_checkpointing = True
    if cfg.compile:
        model.compile()  # in place: parameter names (and so checkpoints) stay unchanged
    return wrap_model(model, cfg, rt.env, rt.device)


def wrap_model(model: nn.Module, cfg: TrainConfig, env: DistEnv, device: torch.device) -> nn.Module:
    """DDP or FSDP2 (each block sharded, then the root) when distributed; else the model."""
    if not env.enabled:
        return model
    if cfg.distributed == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [env.local_rank] if device.type == "cuda" else None
        # every rank builds the same buffers (rotary tables, a QLoRA base's frozen codes), and
        # none changes in training: broadcasting them from rank 0 each forward would copy a
        # quantized base every step (and its int4 kernel bytes, whose layout is per CPU)
        return DDP(model, device_ids=ids, broadcast_buffers=False)
    from torch.distributed.fsdp import fully_shard

    for block in _blocks(model):
        fully_shard(block)
    fully_shard(model)
    return model


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated layers worth sharding one by one: children of the first ModuleList."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            return list(module)
    return []


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under a DDP wrapper (FSDP2 shards in place, nothing to unwrap)."""
    return getattr(model, "module", model) if _is_ddp(model) else model


def _is_ddp(model: nn.Module) -> bool:
    from torch.nn.parallel import DistributedDataParallel as DDP

    return isinstance(model, DDP)


def _is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def no_sync(model: nn.Module, skip_sync: bool) -> Iterator[None]:
    """Skips DDP's gradient all-reduce on micro-batches before the last of a step."""
    if skip_sync and _is_ddp(model):
        with model.no_sync():
            yield
    else:
        yield


def zero1_optimizer(groups: list[dict], optimizer_cls: type, **defaults: object):
    """ZeRO-1: each rank keeps the optimizer state of its shard of the parameters."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(groups, optimizer_class=optimizer_cls, **defaults)


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar tensor over all ranks, on its device (no host sync)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    total = value.detach().double().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict | None]:
    """Whole (unsharded) model and optimizer state dicts; a collective call on every rank.

    Returns the optimizer state only where it is complete (rank 0 under ZeRO-1).
    """
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts), get_optimizer_state_dict(
            model, optimizer, options=opts
        )
    if hasattr(optimizer, "consolidate_state_dict"):  # ZeRO-1
        optimizer.consolidate_state_dict(to=0)
        optim_sd = optimizer.state_dict() if dist.get_rank() == 0 else None
    else:
        optim_sd = optimizer.state_dict()
    return unwrap(model).state_dict(), optim_sd


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model state dict on CPU (a collective under FSDP2: call it on every rank)."""
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts)
    return unwrap(model).state_dict()


def is_sharded(model: nn.Module) -> bool:
    """True for an FSDP2-sharded model (its parameters are DTensor shards)."""
    return _is_fsdp(model)


def load_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict
) -> None:
    """Inverse of full_state: every rank loads the whole state and keeps its shard."""
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_sd, options=opts)
        set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)
        return
    unwrap(model).load_state_dict(model_sd)
    optimizer.load_state_dict(optim_sd)
