"""Checkpoints for exact resume: `checkpoints/step_N/`, written atomically, pruned by policy.

A checkpoint holds everything the next step depends on: weights (model.safetensors), optimizer
state (optimizer.pt), the loop's counters and the data loader's position (state.pt), every RNG
(python, numpy, torch, cuda; one file per rank), and meta.json (step, val loss) for people and
for the retention policy. It is assembled in a hidden temp directory and renamed into place, so
a process killed mid-save leaves either the previous checkpoints or a complete new one.
Loading uses torch.load(weights_only=True): nothing is unpickled.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.artifacts import RUN_MARKER, checkpoints_run_hash
from lmforge.errors import InputError
from lmforge.train.distributed import barrier, full_state, load_full_state

_STEP_DIR = re.compile(r"^step_(\d+)$")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Every RNG that can change what happens next, as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of rng_state."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- weights


def save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors, with tied tensors stored once and their other names kept as aliases."""
    seen: dict[tuple, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state_dict.items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            tensors[name] = tensor.detach().contiguous().cpu()
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)})


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Inverse of save_weights: every original name, tied ones pointing at the same tensor."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        aliases = json.loads((fh.metadata() or {}).get("aliases", "{}"))
    tensors = load_file(str(path))
    for name, target in aliases.items():
        tensors[name] = tensors[target]
    return tensors


# --------------------------------------------------------------------------- save / load


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under root as (step, path), oldest first."""
    found = []
    if Path(root).is_dir():
        for path in Path(root).iterdir():
            match = _STEP_DIR.match(path.name)
            if match and (path / "state.pt").is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    dirs = step_dirs(root)
    return dirs[-1][1] if dirs else None


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    loader: Any = None,
    loop_state: dict[str, Any] | None = None,
    val_loss: float | None = None,
    keep_last: int = 2,
    keep_best: bool = True,
) -> Path:
    """Writes root/step_N atomically (a collective call under torchrun), then prunes old ones."""
    root = Path(root)
    final, tmp = root / f"step_{step}", root / f".step_{step}.tmp"
    model_sd, optim_sd = full_state(model, optimizer)
    rank = _rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_weights(model_sd, tmp / "model.safetensors")
        torch.save(optim_sd, tmp / "optimizer.pt")
        loader_sd = loader.state_dict() if hasattr(loader, "state_dict") else None
        torch.save({"step": step, "loop": loop_state or {}, "loader": loader_sd}, tmp / "state.pt")
        meta = {"step": step, "val_loss": val_loss}
        (tmp / "meta.json").write_text(json.dumps(meta) + "\n", encoding="utf-8")
    barrier()
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        prune_checkpoints(root, keep_last=keep_last, keep_best=keep_best)
    barrier()
    return final


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, *, loader: Any = None
) -> dict[str, Any]:
    """Restores model, optimizer, loader position and RNGs; returns state.pt's contents."""
    path = Path(path)
    if not (path / "state.pt").is_file():
        raise InputError(
            f"{path}: not a complete checkpoint (no state.pt); delete it to start over"
        )
    model_sd = load_weights(path / "model.safetensors")
    optim_sd = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    load_full_state(model, optimizer, model_sd, optim_sd)
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    if loader is not None and state.get("loader") is not None:
        loader.load_state_dict(state["loader"])
    rng_file = path / f"rng_rank{_rank()}.pt"
    if not rng_file.is_file():  # a different world size than the saving run: rank 0's RNG
        rng_file = path / "rng_rank0.pt"
    set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return state


def prune_checkpoints(root: Path, keep_last: int, keep_best: bool = True) -> list[Path]:
    """Deletes checkpoints beyond the newest `keep_last` (and the best val one); returns them."""
    dirs = step_dirs(root)
    keep = {p for _, p in dirs[-keep_last:]}
    if keep_best:
        scored = [(v, s, p) for s, p in dirs if (v := _val_loss(p)) is not None]
        if scored:
            keep.add(min(scored)[2])
    removed = [p for _, p in dirs if p not in keep]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    for stale in Path(root).glob(".step_*.tmp"):  # left by a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    return removed


def _val_loss(path: Path) -> float | None:
    try:
        return json.loads((path / "meta.json").read_text(encoding="utf-8")).get("val_loss")
    except (OSError, json.JSONDecodeError):
        return None


def forget_other_runs(ckpt_root: Path, run_hash: str) -> None:
    """Checkpoints of another run (config or input data changed) must not be resumed: remove
    them. run_hash is StageContext.run_hash; run_stage reads the same marker."""
    if ckpt_root.is_dir() and checkpoints_run_hash(ckpt_root) != run_hash:
        shutil.rmtree(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    (ckpt_root / RUN_MARKER).write_text(json.dumps({"run_hash": run_hash}) + "\n", encoding="utf-8")
