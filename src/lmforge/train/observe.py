"""Views of a training run's metrics.jsonl: TensorBoard event files and a loss plot.

Both are derived from metrics.jsonl after training, so a resumed run's pictures cover the whole
run and the loop writes only one thing. Any training stage (pretrain, finetune, align) calls them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lmforge.common.plots import pyplot

log = logging.getLogger(__name__)

# Scalars worth a TensorBoard chart; anything else in metrics.jsonl is left to the file.
_SCALARS = ("loss", "val_loss", "val_ppl", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens_seen")


def write_tensorboard(rows: list[dict[str, Any]], logdir: Path) -> Path | None:
    """Writes one event file with every numeric metric by step; None without tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # pragma: no cover - tensorboard is a core dependency
        log.warning("tensorboard is not installed; skipping event files (pip install tensorboard)")
        return None
    logdir = Path(logdir)
    writer = SummaryWriter(log_dir=str(logdir))
    try:
        for row in rows:
            step = row.get("step")
            if step is None:
                continue
            for key in _SCALARS:
                value = row.get(key)
                if isinstance(value, (int, float)):
                    tag = f"val/{key}" if key.startswith("val_") else f"train/{key}"
                    writer.add_scalar(tag, value, global_step=int(step))
    finally:
        writer.close()
    return logdir


def plot_losses(rows: list[dict[str, Any]], path: Path, title: str = "loss") -> Path:
    """loss.png: train loss per step and val loss at each eval, on one axis."""
    plt = pyplot()
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r and "step" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), label="val", marker="o", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
