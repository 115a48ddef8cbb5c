"""Supervised fine-tuning data: chat rendering, assistant-only loss masks, truncation, packing.

A conversation is rendered with the tokenizer's Jinja chat template exactly as transformers'
apply_chat_template does (same Jinja settings). The loss mask comes from character spans: for
each assistant turn, the text added between rendering the conversation up to it (with the
generation prompt) and rendering it including that turn is the assistant's span (its content
and end-of-turn marker); tokens starting inside a span are trained on, everything else is
context. Examples longer than train.seq_len follow the truncation policy, and short ones are
packed into rows with doc_ids so attention never crosses an example boundary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lmforge.errors import InputError

# A plain ChatML template, used only when the tokenizer directory carries none.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
Truncation = Literal["left", "right", "drop"]


@dataclass
class ChatTokenizer:
    """A tokenizer.json plus its chat template and special tokens, from a model/tokenizer dir."""

    tokenizer: Any  # tokenizers.Tokenizer
    template: str
    special: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dir(cls, path: Path) -> ChatTokenizer:
        from tokenizers import Tokenizer

        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise InputError(
                f"{path} has no tokenizer.json; fine-tuning needs the model's tokenizer files "
                "beside config.json (lmforge pretrain writes them into final/)"
            )
        config = {}
        if (path / "tokenizer_config.json").is_file():
            config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        template = config.get("chat_template")
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        special = {}
        for key in ("bos_token", "eos_token", "pad_token"):
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                special[key] = value
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        return cls(tok, template or DEFAULT_CHAT_TEMPLATE, special)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The conversation as text, as transformers' apply_chat_template(tokenize=False)."""
        return _compiled(self.template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special
        )

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, char offsets); special tokens come only from the rendered text."""
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        return list(enc.ids), list(enc.offsets)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def pad_id(self) -> int:
        pad = self.token_id(self.special.get("pad_token") or self.special.get("eos_token"))
        return pad if pad is not None else 0

    def stop_ids(self) -> list[int]:
        """Token ids that end an assistant turn: eos and the template's end-of-turn marker."""
        candidates = [self.special.get("eos_token"), "<|im_end|>", "<|eot_id|>", "</s>"]
        return sorted({i for t in candidates if (i := self.token_id(t)) is not None})


_TEMPLATES: dict[str, Any] = {}


def _compiled(template: str) -> Any:
    """A Jinja template with transformers' chat-template environment (cached)."""
    if template not in _TEMPLATES:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent)
        env.globals["raise_exception"] = raise_exception
        _TEMPLATES[template] = env.from_string(template)
    return _TEMPLATES[template]


def assistant_spans(tok: ChatTokenizer, messages: list[dict[str, str]]) -> list[tuple[int, int]]:
    """Character spans of the rendered text that the model should learn to produce."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tok.render(messages[:i], add_generation_prompt=True)
        upto = tok.render(messages[: i + 1])
        if not upto.startswith(before):
            raise InputError(
                "the chat template renders a conversation prefix differently from the whole "
                "conversation, so assistant tokens cannot be located; use an append-only template"
            )
        spans.append((len(before), len(upto)))
    return spans


def encode_chat(tok: ChatTokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(token ids, loss mask): mask 1 exactly on tokens that start inside an assistant span."""
    text = tok.render(messages)
    ids, offsets = tok.encode(text)
    spans = assistant_spans(tok, messages)
    mask = [int(any(lo <= start < hi for lo, hi in spans)) for start, _ in offsets]
    return ids, mask


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
    tok: ChatTokenizer,
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
        ids, mask = encode_chat(tok, example["messages"])
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
