"""Held-out evaluation of fine-tuned models: greedy answers scored by ROUGE-L, and val losses.

ROUGE-L here is the F1 of the longest common subsequence over lowercased word tokens (Lin, 2004),
the same number rouge-score gives without stemming; it is small enough to keep in one function
so the fine-tuning stage needs no extra dependency.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.finetune.sft import chat_of
from lmforge.tokenizer.files import TokenizerFiles

_WORD = re.compile(r"[a-z0-9]+")


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 between two strings (lowercased alphanumeric tokens)."""
    a, b = _WORD.findall(prediction.lower()), _WORD.findall(reference.lower())
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def answer_prompt(tok: TokenizerFiles, example: dict[str, Any]) -> str:
    """The conversation up to its last assistant turn, ready for that answer; a tool conversation
    is rendered from its OpenAI form as it is trained and served (sft.chat_of)."""
    msgs, tools = chat_of(example)
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return tok.render_chat(msgs[:last], add_generation_prompt=True, tools=tools)


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tok: TokenizerFiles,
    examples: list[dict[str, Any]],
    stops: Sequence[int],
    max_new_tokens: int = 48,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answer to each example's conversation up to its last assistant turn.

    stops: the token ids that end an answer (the model's generation_config eos_token_id).
    Prompts run batch_size at a time, left-padded (model.generate.generate_batched); the answers
    equal one-at-a-time generation.
    """
    from lmforge.model.generate import generate_batched

    room = model.config.block_size - max_new_tokens
    prompts = [tok.encode(answer_prompt(tok, example))[-room:] for example in examples]
    new = generate_batched(
        model, prompts, max_new_tokens, batch_size=batch_size, stop_tokens=stops, greedy=True
    )
    return [tok.decode([t for t in ids if t not in stops]).strip() for ids in new]


def rouge_eval(
    model: nn.Module,
    tok: TokenizerFiles,
    examples: list[dict[str, Any]],
    stops: Sequence[int],
    max_new_tokens: int = 48,
    batch_size: int = 16,
) -> tuple[float, list[dict[str, Any]]]:
    """Mean ROUGE-L of greedy answers against the reference answers, and per-example rows."""
    answers = generate_answers(model, tok, examples, stops, max_new_tokens, batch_size)
    rows = []
    for example, answer in zip(examples, answers, strict=True):
        reference = [m for m in example["messages"] if m["role"] == "assistant"][-1]["content"]
        rows.append(
            {"prediction": answer, "reference": reference, "rouge_l": rouge_l(answer, reference)}
        )
    return float(np.mean([r["rouge_l"] for r in rows])) if rows else 0.0, rows
