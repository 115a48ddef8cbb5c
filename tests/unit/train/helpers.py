"""Tiny models, token arrays and stage contexts shared by the train tests."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.artifacts import StageContext
from lmforge.common.logging import MetricsWriter


class TinyLM(nn.Module):
    """Embedding -> one MLP block -> LayerNorm -> tied head: enough to learn a bigram table."""

    def __init__(self, vocab: int = 32, width: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))]
        )
        self.drop = nn.Dropout(dropout)
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        nn.init.normal_(self.wte.weight, std=0.1)
        self.gradient_checkpointing = False

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx)
        for block in self.blocks:
            x = x + self.drop(block(x))
        return self.lm_head(self.ln_f(x))


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    logits = model(batch["input_ids"])
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    return loss, {}


class KilledAt:
    """Wraps a loader and raises after `n` batches: a run that dies mid-training."""

    def __init__(self, loader, n: int) -> None:
        self.loader, self.n = loader, n

    def __iter__(self):
        return self

    def __next__(self):
        if self.loader.position >= self.n:
            raise KeyboardInterrupt("killed")
        return next(self.loader)

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)


def bigram_tokens(n: int = 20_000, vocab: int = 32, seed: int = 0) -> np.ndarray:
    """A learnable stream: each token is mostly (previous + 1) mod vocab."""
    rng = np.random.default_rng(seed)
    out = np.empty(n, dtype=np.uint16)
    out[0] = 0
    noise = rng.random(n) < 0.1
    rand = rng.integers(0, vocab, n)
    for i in range(1, n):
        out[i] = rand[i] if noise[i] else (out[i - 1] + 1) % vocab
    return out


def make_ctx(out: Path) -> StageContext:
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(
        out=out,
        stage="test",
        log=logging.getLogger("test"),
        metrics=MetricsWriter(out / "metrics.jsonl"),
    )
