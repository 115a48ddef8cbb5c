"""Sampling from a model directory by hand: what `lmforge generate` runs.

The quickest check of a trained model is to read what it writes. Prompts come from the command
line or a file (plain text: one prompt per line; .jsonl: a "prompt" field per record), run in
left-padded batches through EvalModel.generate_batch, and come back as records that can be
printed or written as JSONL.
"""

from __future__ import annotations

from typing import Any

from lmforge.errors import ConfigError, InputError
from lmforge.evals.lm import EvalModel, GenerationSettings


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
    if num_samples > 1 and settings.num_beams > 1:
        raise ConfigError(
            f"num_samples={num_samples} with num_beams={settings.num_beams} would repeat one beam "
            "answer (beam search is deterministic); drop --num-samples or --num-beams"
        )
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
