"""A LoRA adapter served as a model of its own name: what the routes call an engine, backed by its
base's engine, whose batch its rows share with the base's and the other adapters' rows.

The routes and request preparation resolve a request's `model` to an engine and use its files,
context and defaults, submit and abort; AdapterEngine answers them from the base's engine, its
submissions carrying the adapter's name. Chat renders with the adapter directory's own chat
template when it has one (a chat fine-tune may ship its template beside its adapter), else the
base's; the tokenizer is always the base's (lora_adapters refuses another vocabulary).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from lmforge.serve.engine import Engine
from lmforge.serve.handle import RequestHandle
from lmforge.serve.lora_adapters import AdapterUpdate
from lmforge.serve.sampling import SamplingParams


class AdapterEngine:
    """One adapter on its base's engine (see module)."""

    def __init__(self, base: Engine, adapter: AdapterUpdate) -> None:
        self.base = base
        self.name = adapter.name
        self.path: Path = adapter.path
        template = adapter.chat_template
        self.files = base.files if template is None else replace(base.files, chat_template=template)
        self.max_context = base.max_context
        self.request_defaults = base.request_defaults  # its generation_config's, the base's

    def token_room(self, prompt_len: int) -> int:
        return self.base.token_room(prompt_len)

    def submit(
        self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str
    ) -> RequestHandle:
        return self.base.submit(prompt_ids, params, request_id, adapter=self.name)

    def abort(self, request_id: str) -> None:
        self.base.abort(request_id)
