"""Pieces of OpenAI's response bodies: ids, timestamps, usage and the logprobs layouts (plain dicts,
so that the JSON matches OpenAI's field names; the openai client parses them into its own types)."""

from __future__ import annotations

import time
import uuid
from typing import Any


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class LogprobsBuilder:
    """Accumulates per-token logprobs into the completions or the chat layout.

    Completions: {"tokens", "token_logprobs", "top_logprobs", "text_offset"}; chat:
    {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}.
    """

    def __init__(self, chat: bool, text_offset: int = 0) -> None:
        self.chat = chat
        self.offset = text_offset
        self.tokens: list[str] = []
        self.logprobs: list[float | None] = []
        self.tops: list[dict[str, float] | None] = []
        self.offsets: list[int] = []

    def add(self, token: str, logprob: float | None, top: dict[str, float] | None) -> None:
        self.tokens.append(token)
        self.logprobs.append(logprob)
        self.tops.append(top)
        self.offsets.append(self.offset)
        self.offset += len(token)

    def build(self, start: int = 0) -> dict[str, Any]:
        """The layout for tokens[start:] (a stream chunk sends only its new tokens)."""
        rows = range(start, len(self.tokens))
        if self.chat:
            return {
                "content": [
                    {
                        "token": self.tokens[i],
                        "logprob": self.logprobs[i],
                        "bytes": list(self.tokens[i].encode("utf-8")),
                        "top_logprobs": [
                            {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}
                            for t, lp in (self.tops[i] or {}).items()
                        ],
                    }
                    for i in rows
                ]
            }
        return {
            "tokens": [self.tokens[i] for i in rows],
            "token_logprobs": [self.logprobs[i] for i in rows],
            "top_logprobs": [self.tops[i] or {} for i in rows],
            "text_offset": [self.offsets[i] for i in rows],
        }
