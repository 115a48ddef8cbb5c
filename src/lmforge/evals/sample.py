"""Sampling from a model directory by hand: what `lmforge generate` runs.

The quickest check of a trained model is to read what it writes. Prompts come from the command
line or a file (plain text: one prompt per line; .jsonl: a "prompt" field per record), run in
left-padded batches through EvalModel.generate_batch, and come back as records that can be
printed or written as JSONL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.common.io import read_user_jsonl
from lmforge.errors import ConfigError, InputError
from lmforge.evals.lm import EvalModel, GenerationSettings


def read_prompts(path: Path) -> list[str]:
    """Prompts from a file: one per non-empty line, or a "prompt" field per line of a .jsonl."""
    if not path.is_file():
        raise InputError(f"{path}: prompts file not found")
    if path.suffix != ".jsonl":
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = []
    for number, record in read_user_jsonl(path):
        if not isinstance(record.get("prompt"), str):
            raise InputError(f'{path} line {number}: expected an object with a "prompt" string')
        prompts.append(record["prompt"])
    return prompts


def sample(
    model: EvalModel,
    prompts: list[str],
    settings: GenerationSettings,
    *,
    chat: bool = False,
    num_samples: int = 1,
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    """num_samples completions of every prompt: [{"prompt", "sample", "completion"}, ...].

    chat=True sends each prompt as a user turn through the model's chat template (for
    fine-tuned models); otherwise the model continues the raw text.
    """
    if not prompts:
        raise InputError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE")
    if num_samples > 1 and settings.temperature == 0:
        raise ConfigError(
            f"num_samples={num_samples} with temperature 0 would repeat one greedy answer; "
            "set --temperature above 0 (e.g. 0.8)"
        )
    if chat and model.chat_template is None:
        raise InputError(
            f"{model.path} has no chat template; drop --chat to continue raw text instead"
        )
    asked = [p for p in prompts for _ in range(num_samples)]
    completions = model.generate_batch(asked, settings, chat=chat, batch_size=batch_size)
    return [
        {"prompt": prompt, "sample": i % num_samples, "completion": text}
        for i, (prompt, text) in enumerate(zip(asked, completions, strict=True))
    ]
