"""Preference pairs -> fixed-size training rows, chosen and rejected side by side.

Each pair becomes rows of shape (2, T): index 0 the chosen conversation, 1 the rejected one, each
the prompt plus one assistant reply rendered with the model's chat template (the SFT encoding, so
a policy is scored on exactly the tokens it was fine-tuned to produce; a tool conversation as it
was served: through a template that reads `tools`, else as Hermes turns). Arrays: `input_ids`
(N, 2, T) right-padded with the pad id, `labels` (N, 2, T) holding the next token only where it
belongs to the reply (its end-of-turn marker included) and -100 elsewhere, and `last` (N, 2), the
position a reward head pools (finetune.heads.pooled_index: the last non-pad token, as transformers'
*ForSequenceClassification). A conversation longer than T keeps its start; a pair in which either
reply is cut away entirely is dropped and counted; the kept pairs' indices come back beside the
rows (the synthetic pairs' `kind` follows them into per-kind metrics).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lmforge.errors import ConfigError, InputError
from lmforge.finetune.evaluate import answer_prompt
from lmforge.finetune.heads import pooled_index
from lmforge.finetune.sft import example_ids
from lmforge.model.transformer import IGNORE_INDEX


def reply_example(
    prompt: list[dict[str, str]], reply: str, tool_conversation: dict[str, Any] | None = None
) -> dict[str, Any]:
    """prompt + reply as a finetune chat example: `messages`, and for a tool conversation (the
    prompt's OpenAI form and its tools, align.prefs.prompt_fields) `tool_conversation` with the
    reply appended. Training (encode_reply, through sft.example_ids) and held-out ROUGE-L
    (finetune.evaluate.answer_prompt) both render it through sft.chat_of, so the reply is
    prompted by the same ids in both: through a template that reads `tools`, as `lmforge serve`
    rendered it, else as the Hermes turns `prompt` holds."""
    answer = {"role": "assistant", "content": reply}
    example: dict[str, Any] = {"messages": [*prompt, answer]}
    if tool_conversation is not None:
        example["tool_conversation"] = {
            "messages": [*tool_conversation["messages"], answer],
            "tools": tool_conversation["tools"],
        }
    return example


def prompt_ids(
    tok: Any, prompt: list[dict[str, str]], tool_conversation: dict[str, Any] | None = None
) -> list[int]:
    """The ids that prompt a reply to `prompt`, through the generation prompt: what PPO and GRPO
    sample their answers after, as held-out ROUGE-L prompts (answer_prompt of reply_example; the
    empty reply is what it leaves out) and as encode_reply's rows hold before the reply."""
    return tok.encode(answer_prompt(tok, reply_example(prompt, "", tool_conversation)))


def encode_reply(
    tok: Any,
    prompt: list[dict[str, str]],
    reply: str,
    seq_len: int,
    tool_conversation: dict[str, Any] | None = None,
) -> tuple[list[int], list[int], bool]:
    """(ids, labels, truncated) of prompt + reply cut to seq_len; labels mark the reply, the text
    the model wrote (its tool calls the Hermes blocks it generated), rendered as reply_example."""
    example = reply_example(prompt, reply, tool_conversation)
    ids, mask = _reply_only(example_ids(tok, example))
    truncated = len(ids) > seq_len
    ids, mask = ids[:seq_len], mask[:seq_len]
    labels = [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)]
    return ids, [*labels, IGNORE_INDEX], truncated


def _reply_only(encoded: tuple[list[int], list[int]]) -> tuple[list[int], list[int]]:
    """(ids, mask) with the mask on the last assistant turn only, the reply: the chat encoding
    marks every assistant turn, and a prompt's own (a tool call answered by its results) is
    context to condition on, not a reply to score."""
    ids, mask = encoded
    end = max((t for t, m in enumerate(mask) if m), default=-1)
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return ids, [int(start <= t <= end) for t in range(len(mask))]


def encode_pairs(
    tok: Any, pairs: list[dict[str, Any]], seq_len: int
) -> tuple[dict[str, np.ndarray], dict[str, int], list[int]]:
    """(rows, counts, kept): rows for every pair that keeps a reply token on both sides, and
    `kept`, the index in `pairs` of each row's pair (for what travels beside a pair: its kind,
    a KTO example's label)."""
    kept: list[tuple[list[int], list[int]]] = []
    truncated = dropped = 0
    indices: list[int] = []
    for i, pair in enumerate(pairs):
        sides = [
            encode_reply(tok, pair["prompt"], pair[k], seq_len, pair.get("tool_conversation"))
            for k in ("chosen", "rejected")
        ]
        truncated += sum(cut for _, _, cut in sides)
        if any(all(t == IGNORE_INDEX for t in labels) for _, labels, _ in sides):
            dropped += 1
            continue
        kept.extend((ids, labels) for ids, labels, _ in sides)
        indices.append(i)
    if not kept:
        raise InputError(
            f"no preference pair keeps a reply within train.seq_len={seq_len}; raise train.seq_len"
        )
    n = len(kept) // 2
    ids = np.full((n * 2, seq_len), tok.pad_id, dtype=np.int64)
    labels = np.full((n * 2, seq_len), IGNORE_INDEX, dtype=np.int64)
    last = np.zeros(n * 2, dtype=np.int64)
    for r, (row_ids, row_labels) in enumerate(kept):
        ids[r, : len(row_ids)] = row_ids
        labels[r, : len(row_labels)] = row_labels
        last[r] = pooled_index(row_ids, tok.pad_id)
    rows = {
        "input_ids": ids.reshape(n, 2, seq_len),
        "labels": labels.reshape(n, 2, seq_len),
        "last": last.reshape(n, 2),
    }
    return rows, {"pairs": n, "truncated": truncated, "dropped": dropped}, indices


def refuse_other_vocab(theirs: Any, ours: Any, role: str, fix: str) -> None:
    """ConfigError naming a token a model's tokenizer (theirs, the model set by `role`) maps to
    another id than the policy's (ours): it would score ids it never read. Added tokens count
    (they are ids the policy can emit); merges, normalizer and chat template do not (the policy's
    ids are read)."""
    a, b = theirs.tokenizer.get_vocab(), ours.tokenizer.get_vocab()  # both: ~35 ms at 50k tokens
    if a == b:
        return
    token = min(a.keys() ^ b.keys() or {t for t in a if a[t] != b[t]})
    ids = [v.get(token, "absent") for v in (a, b)]
    raise ConfigError(
        f"{role}={theirs.path}'s tokenizer.json maps tokens to other ids than the policy's "
        f"({ours.path}), e.g. {token!r}: id {ids[0]} vs {ids[1]}; it would score ids it never "
        f"read; {fix}"
    )
