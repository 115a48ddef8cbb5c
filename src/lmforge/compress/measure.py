"""What compression.json compares: bytes on disk, decode speed and perplexity, before and after.

Speed is greedy decoding through lmforge.model.generate (prefill, then one cached token a step)
from a fixed random prompt, timed after one warm-up run; quality is lmforge.evals.perplexity on
the first documents of a split, so "before" and "after" score exactly the same tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.evals.lm import EvalModel
from lmforge.evals.perplexity import perplexity

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".onnx", ".data", ".gguf")


def weights_bytes(path: Path) -> int:
    """Bytes of the weight files of a model directory (or one weight file)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in WEIGHT_SUFFIXES)


def prompt_ids(vocab_size: int, prompt_tokens: int, seed: int = 0) -> torch.Tensor:
    """A fixed random prompt (1, prompt_tokens): the same for every model compared."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, prompt_tokens), generator=gen)


def time_decode(step: Callable[[], int], repeats: int = 1) -> float:
    """Tokens per second of `step` (which generates and returns its token count), best of runs
    after one warm-up."""
    step()
    best = float("inf")
    n = 0
    for _ in range(repeats):
        start = time.perf_counter()
        n = step()
        best = min(best, time.perf_counter() - start)
    return n / max(best, 1e-9)


def decode_tokens_per_s(
    model: nn.Module, prompt_tokens: int, new_tokens: int, repeats: int = 1
) -> float:
    """Greedy decode speed of a Transformer with its KV cache (lmforge.model.generate)."""
    from lmforge.model.generate import generate

    idx = prompt_ids(model.config.vocab_size, prompt_tokens)

    @torch.no_grad()
    def step() -> int:
        return generate(model, idx, new_tokens, greedy=True).size(1) - idx.size(1)

    return time_decode(step, repeats)


def quality(model: EvalModel, texts: list[str]) -> dict[str, Any]:
    """Perplexity (an encoder's: pseudo-perplexity) and bits-per-byte of model on texts
    (lmforge.evals.perplexity)."""
    result = perplexity(model, texts).metrics()
    keys = ("perplexity", "pseudo_perplexity", "bits_per_byte", "tokens")
    return {k: result[k] for k in keys if k in result}


def delta_pct(after: float | None, before: float | None) -> float | None:
    """Relative change in percent (after vs before), None when either is missing."""
    if after is None or not before:
        return None
    return 100.0 * (after - before) / before


def model_report(
    model: EvalModel, weights: Path, texts: list[str] | None, speed: Any
) -> dict[str, Any]:
    """weights_bytes, tokens_per_s (a causal model's: an encoder does not decode) and (with
    texts) perplexity / bits_per_byte of one model."""
    row: dict[str, Any] = {"weights_bytes": weights_bytes(weights)}
    if model.model.config.causal:
        row["tokens_per_s"] = decode_tokens_per_s(
            model.model, speed.prompt_tokens, speed.new_tokens, speed.repeats
        )
    if texts:
        row.update(quality(model, texts))
    return row


def compare(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The headline ratios of compression.json: size, speed and quality after vs before."""
    return {
        "size_ratio": after["weights_bytes"] / max(before["weights_bytes"], 1),
        "speedup": after["tokens_per_s"] / max(before["tokens_per_s"], 1e-9)
        if "tokens_per_s" in after
        else None,
        "perplexity_delta_pct": delta_pct(after.get("perplexity"), before.get("perplexity")),
        "bpb_delta_pct": delta_pct(after.get("bits_per_byte"), before.get("bits_per_byte")),
    }
