"""Supervised fine-tuning data: chat rendering, assistant-only loss masks, truncation, packing.

A conversation is rendered with the tokenizer's Jinja chat template exactly as transformers'
apply_chat_template does (a tool conversation as `lmforge serve` renders it: through a template
that reads `tools`, else as Hermes turns), and the loss mask covers exactly the assistant replies
(with their end-of-turn marker, tool calls included), as located by lmforge.tokenizer.chat: the
template's generation blocks when it has them, else the text each assistant turn adds to the
rendered conversation.
Examples longer than train.seq_len follow the truncation policy, and short ones are packed
into rows with doc_ids so attention never crosses an example boundary.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lmforge.errors import InputError
from lmforge.tokenizer.files import CHATML_TEMPLATE, TokenizerFiles

Truncation = Literal["left", "right", "drop"]
log = logging.getLogger(__name__)


def load_chat_tokenizer(path: Path) -> TokenizerFiles:
    """The tokenizer files of a model directory; ChatML when they carry no chat template."""
    if not (Path(path) / "tokenizer.json").is_file():
        raise InputError(
            f"{path} has no tokenizer.json; fine-tuning needs the model's tokenizer files "
            "beside config.json (lmforge pretrain writes them into final/)"
        )
    tok = TokenizerFiles.load(path)
    if tok.chat_template is None:
        log.warning("%s has no chat template; rendering conversations as ChatML", path)
        tok.chat_template = CHATML_TEMPLATE
    return tok


def encode_chat(
    tok: TokenizerFiles, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> tuple[list[int], list[int]]:
    """(token ids, loss mask): 1 exactly on the tokens of assistant replies (tool calls too).

    The spans come from the tokenizer package (the template's generation blocks, as
    transformers' return_assistant_tokens_mask, or prefix renders for other templates).
    """
    enc = tok.encode_chat(messages, tools=tools)
    return enc.ids, enc.assistant_mask


def chat_of(example: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict] | None]:
    """(messages, tools) to render of a chat example: a tool conversation in its OpenAI form,
    which the tokenizer renders as `lmforge serve` does (through a template that reads `tools`,
    so the model learns the prompt it is served with, else as Hermes turns), else `messages`."""
    tooled = example.get("tool_conversation")
    if tooled is None:
        return example["messages"], None
    return tooled["messages"], tooled["tools"]


def example_ids(tok: TokenizerFiles, example: dict[str, Any]) -> tuple[list[int], list[int]]:
    """encode_chat of a chat example's conversation (chat_of)."""
    return encode_chat(tok, *chat_of(example))


def truncate(
    ids: list[int], mask: list[int], seq_len: int, policy: Truncation
) -> tuple[list[int], list[int]] | None:
    """Fits an example into seq_len: keep the start (right), the end (left), or drop it (None)."""
    if len(ids) <= seq_len:
        return ids, mask
    if policy == "drop":
        return None
    if policy == "left":
        return ids[-seq_len:], mask[-seq_len:]
    return ids[:seq_len], mask[:seq_len]


def build_sft_rows(
    tok: TokenizerFiles,
    examples: list[dict[str, Any]],
    seq_len: int,
    *,
    truncation: Truncation = "right",
    packing: bool = True,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Encodes, truncates and packs chat examples into (N, seq_len) training rows + stats."""
    from lmforge.train.loader import pack_documents

    docs, masks = [], []
    counts = {"examples": len(examples), "truncated": 0, "dropped": 0, "no_target": 0}
    for example in examples:
        ids, mask = example_ids(tok, example)
        fitted = truncate(ids, mask, seq_len, truncation)
        if fitted is None:
            counts["dropped"] += 1
            continue
        counts["truncated"] += len(fitted[0]) < len(ids)
        if sum(fitted[1][1:]) == 0:  # nothing left to learn (e.g. the answer was cut off)
            counts["no_target"] += 1
            continue
        docs.append(fitted[0])
        masks.append(fitted[1])
    if not docs:
        raise InputError(
            f"no fine-tuning example fits train.seq_len={seq_len} with a target left "
            f"({counts}); raise train.seq_len or use truncation=right"
        )
    if packing:
        rows, pack_stats = pack_documents(docs, seq_len, loss_masks=masks, pad_id=tok.pad_id)
    else:  # one example per row: pack each alone and stack
        parts = [
            pack_documents([d], seq_len, loss_masks=[m], pad_id=tok.pad_id)
            for d, m in zip(docs, masks, strict=True)
        ]
        rows = {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}
        pad = float((rows["doc_ids"] < 0).mean())
        pack_stats = {"rows": len(rows["input_ids"]), "pad_fraction": pad}
    counts.update(rows=int(pack_stats["rows"]), pad_fraction=round(pack_stats["pad_fraction"], 4))
    counts["target_tokens"] = int((rows["labels"] >= 0).sum())
    return rows, counts
