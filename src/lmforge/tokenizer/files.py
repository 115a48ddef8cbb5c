"""A tokenizer directory as every stage reads it: tokenizer.json, its special tokens, chat template.

The directory layout is the Hugging Face one (tokenizer.json, tokenizer_config.json,
special_tokens_map.json, chat_template.jinja), so `transformers.AutoTokenizer` loads what we
write and we load what it writes. Pretraining, fine-tuning and evaluation all read tokenizers
through `TokenizerFiles`, so special-token and chat-template handling lives in one place.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from lmforge.common.json_cache import read_json_object
from lmforge.errors import ConfigError, InputError
from lmforge.tokenizer.chat import (
    CHATML_TEMPLATE,
    ChatEncoding,
    encode_chat,
    render_chat,
    turn_end,
)
from lmforge.tokenizer.hermes_tools import template_turns

# CHATML_TEMPLATE lives in chat.py; importers of it from here keep working.
__all__ = ["CHATML_TEMPLATE", "TOKENIZER_HINT", "TokenizerFiles", "tokenizer_hash"]

log = logging.getLogger(__name__)

TOKENIZER_HINT = "lmforge tokenizer train --data DIR --out DIR"
# what to do about a malformed tokenizer.json, tokenizer_config.json or special_tokens_map.json
TOKENIZER_FIX = f"mend it, or save the tokenizer again (save_pretrained, or {TOKENIZER_HINT})"
# The files that make a directory loadable by transformers.AutoTokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copies the tokenizer files src has into dst, so dst is a complete model directory."""
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)


def tokenizer_hash(tokenizer_dir: Path) -> str:
    """The tokenizer's identity: xxh3-128 of tokenizer.json (shards record it in meta.json)."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise InputError(f"{tokenizer_dir} has no tokenizer.json; build one with: {TOKENIZER_HINT}")
    return xxhash.xxh3_128(path.read_bytes()).hexdigest()


def _token_string(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or {"content": ...}."""
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) else None


def longest_first(lengths: list[int], budget: int) -> list[int]:
    """How many tokens of each text (one or two) to keep within budget, as the tokenizers
    library's longest_first truncation keeps them: the shorter text whole if it fits in half, the
    longer gets the rest; else each half (the longer one the odd token)."""
    if sum(lengths) <= budget:
        return list(lengths)
    if len(lengths) == 1:
        return [budget]
    short, long = sorted(lengths)
    long = short if short > budget else max(short, budget - short)
    if short + long > budget:
        short, long = budget // 2, budget // 2 + budget % 2
    return [long, short] if lengths[0] > lengths[1] else [short, long]


def dir_chat_template(path: Path, config: dict[str, Any]) -> str | None:
    """A directory's chat template: its chat_template.jinja, else `config`'s (its
    tokenizer_config.json as read) chat_template when that is a string."""
    if (Path(path) / "chat_template.jinja").is_file():
        return (Path(path) / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    return template if isinstance(template, str) else None


@dataclass
class TokenizerFiles:
    """tokenizer.json plus the metadata around it, loaded from a tokenizer or model directory."""

    path: Path
    tokenizer: Any  # tokenizers.Tokenizer
    chat_template: str | None = None
    special: dict[str, str] = field(default_factory=dict)  # bos/eos/pad/unk/mask_token -> token

    @classmethod
    def load(cls, path: Path | str) -> TokenizerFiles:
        """Reads a directory written by lmforge or by transformers' save_pretrained."""
        from tokenizers import Tokenizer

        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise InputError(f"{path} has no tokenizer.json; build one with: {TOKENIZER_HINT}")
        try:
            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
            raise InputError(
                f"{path}/tokenizer.json cannot be read ({exc}); {TOKENIZER_FIX}"
            ) from None
        # lengths are cut by the caller (encode_input's max_len, seq_len): a truncation saved in
        # tokenizer.json must not cut encode() silently; set once here, never toggled after
        tok.no_truncation()
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later wins
            if (path / name).is_file():
                config.update(read_json_object(path / name, TOKENIZER_FIX))
        template = dir_chat_template(path, config)
        special = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token"):
            token = _token_string(config.get(key))
            if token is not None and tok.token_to_id(token) is not None:
                special[key] = token
        return cls(path, tok, template, special)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.special.get("bos_token"))

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.special.get("eos_token"))

    @property
    def mask_id(self) -> int | None:
        """The [MASK] token's id (masked-LM pretraining), None when the tokenizer has none."""
        return self.token_id(self.special.get("mask_token"))

    def special_ids(self) -> list[int]:
        """Ids of every special added token (never masked, never predicted by MLM)."""
        added = self.tokenizer.get_added_tokens_decoder()
        return sorted(i for i, token in added.items() if token.special)

    @property
    def pad_id(self) -> int:
        """Padding id: pad, else eos, else 0 (padding is always masked out of losses)."""
        for key in ("pad_token", "eos_token"):
            token_id = self.token_id(self.special.get(key))
            if token_id is not None:
                return token_id
        return 0

    def special_token_ids(self) -> dict[str, int]:
        """{"bos_token_id": ..., "eos_token_id": ..., "pad_token_id": ...} for config.json."""
        ids = {}
        for key in ("bos", "eos", "pad"):
            token_id = self.token_id(self.special.get(f"{key}_token"))
            if token_id is not None:
                ids[f"{key}_token_id"] = token_id
        return ids

    def turn_end_token(self) -> str | None:
        """The token the chat template ends an assistant reply with (None without one)."""
        if self.chat_template is None:
            return None
        added = [t.content for t in self.tokenizer.get_added_tokens_decoder().values()]
        try:
            return turn_end(self.chat_template, added, **self.special)
        except InputError as exc:  # a template may refuse a plain user/assistant exchange
            log.warning("%s: %s; generation stops at eos only", self.path, exc)
            return None

    def stop_ids(self) -> list[int]:
        """Tokens that end an assistant reply: eos (the document end), then the chat template's
        end-of-turn token. A model directory's own list is its generation_config.json
        (lmforge.tokenizer.generation); this is what lmforge writes there."""
        ids = [self.eos_id, self.token_id(self.turn_end_token())]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def encode(self, text: str) -> list[int]:
        """Token ids of text; special tokens only where the text spells them."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def encode_input(
        self, text: str, pair: str | None = None, max_len: int | None = None
    ) -> tuple[list[int], list[int], bool]:
        """(ids, token_type_ids, truncated) of a model input, as transformers' tokenizer(text,
        pair, truncation=True, max_length=max_len) makes it: tokenizer.json's post_processor adds
        the specials its model was pretrained with ([CLS] a [SEP] b [SEP], <s> a </s></s> b </s>)
        and marks the pair's segment; longest_first truncation keeps those specials.

        Stateless (the server calls it from several threads): the texts are encoded bare, cut
        here, then post-processed; the shared tokenizer's truncation setting is never touched.
        """
        tok = self.tokenizer
        first = tok.encode(text, add_special_tokens=False)
        second = None if pair is None else tok.encode(pair, add_special_tokens=False)
        truncated = False
        if max_len is not None:
            budget = max_len - tok.num_special_tokens_to_add(pair is not None)
            if budget < 0:
                raise ConfigError(
                    f"max length {max_len} leaves no room for {self.path}'s "
                    f"{max_len - budget} special tokens; raise it"
                )
            lengths = [len(first)] + ([] if second is None else [len(second)])
            keep = longest_first(lengths, budget)
            truncated = keep != lengths
            for enc, n in zip((first, second), keep, strict=False):
                enc.truncate(n)
        enc = tok.post_process(first, second, add_special_tokens=True)
        return list(enc.ids), list(enc.type_ids), truncated

    def template_ends(self) -> tuple[list[int], list[int]]:
        """(ids before, ids after) a single text in the post_processor's template: ([CLS], [SEP])
        for BERT, ([<s>], [</s>]) for RoBERTa, ([], []) for a tokenizer without one."""
        probe = "a b"
        bare = self.encode(probe)
        full, _, _ = self.encode_input(probe)
        start = next(
            (i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare), None
        )
        if start is None:
            raise InputError(f"{self.path}/tokenizer.json: its post_processor rewrites the text")
        return full[:start], full[start + len(bare) :]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, character offsets), for masks built from character spans."""
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        return list(enc.ids), list(enc.offsets)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ids; special tokens dropped unless asked for (as transformers' decode)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _require_template(self) -> None:
        if self.chat_template is None:
            raise InputError(
                f"{self.path} has no chat template (tokenizer_config.json chat_template or "
                "chat_template.jinja); train the tokenizer with lmforge or add one"
            )

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = False,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The conversation as text, exactly as transformers' apply_chat_template(tokenize=False);
        with `tools`, tool calls or tool turns, as hermes_tools.template_turns renders them."""
        self._require_template()
        messages, extra = template_turns(messages, tools, self.chat_template)
        return render_chat(
            messages, add_generation_prompt, template=self.chat_template, **extra, **self.special
        )

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = False,
        tools: list[dict[str, Any]] | None = None,
    ) -> ChatEncoding:
        """Renders and encodes a conversation: ids + assistant_mask (1 = loss on that token);
        tool calling as render_chat renders it."""
        self._require_template()
        messages, extra = template_turns(messages, tools, self.chat_template)
        return encode_chat(
            self.tokenizer,
            messages,
            add_generation_prompt,
            template=self.chat_template,
            **extra,
            **self.special,
        )
