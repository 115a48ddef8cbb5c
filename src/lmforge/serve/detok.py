"""Incremental detokenization for streaming: text that is final the moment it is sent.

Decoding each new token alone is wrong for byte-level BPE: one character can span tokens (a lone
token decodes to U+FFFD) and decoders that add or strip spaces depend on the neighbours. So, as
vLLM and TGI do, each step decodes a short window of ids twice, with and without the new ones,
and sends the difference; while the window's text ends in U+FFFD (a character still incomplete)
nothing is sent. Stop strings are handled on top: the text is cut before the first stop string,
and any tail that could still become one is held back, so no part of a stop string is ever sent.
The texts sent, concatenated, equal decoding all the ids (cut at the stop string). As vLLM does,
stop strings are not looked for before min_tokens: a push with stops_active=False (the caller's
row is still short of min_tokens) never ends the text, and a stop string that lies wholly in the
text written by such pushes never ends it later either.

Special tokens are dropped from the text, except those named in keep_special: a tool request under
tool_choice "auto" keeps the Hermes `<tool_call>` tags, which some models (Hermes 2 Pro, Qwen 2.5)
make special tokens, so that their calls can be read (serve/tools.py ToolPlan.kept_special).
"""

from __future__ import annotations

import weakref
from collections.abc import Collection, Sequence
from typing import Any

REPLACEMENT = "\ufffd"


class TextStream:
    """One request's generated text, revealed token by token."""

    def __init__(
        self, tokenizer: Any, stop: Sequence[str] = (), keep_special: Collection[str] = ()
    ) -> None:
        self.tokenizer = tokenizer  # tokenizers.Tokenizer
        # None: every special token is dropped; else the ids dropped (the special ones not kept)
        self.dropped = _dropped_ids(tokenizer, keep_special) if keep_special else None
        self.stop = tuple(s for s in stop if s)
        self.longest_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: ids before it are decoded for good
        self.read_offset = 0  # ids up to here have had their text appended
        self.text = ""  # all text decoded so far (may include a held-back stop prefix)
        self.sent = 0  # characters of self.text already sent
        self.stops_from = 0  # a stop string counts only if it ends past this index of self.text

    def _decode(self, ids: list[int]) -> str:
        if self.dropped is None:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        kept = [i for i in ids if i not in self.dropped]  # what skip_special_tokens does, less some
        return self.tokenizer.decode(kept, skip_special_tokens=False)

    def push(self, token_id: int, stops_active: bool = True) -> tuple[str, bool]:
        """Adds a token; returns (text to send now, whether a stop string was reached).
        stops_active=False: the text so far may hold stop strings (before min_tokens)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            searched_from = max(0, len(self.text) - self.longest_stop + 1)
            self.text += after[len(before) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            if not stops_active:
                self.stops_from = len(self.text)
            cut = self._find_stop(searched_from)
            if cut is not None:
                self.text = self.text[:cut]
                return self._release(len(self.text)), True
        return self._release(len(self.text) - self._held_back()), False

    def flush(self) -> str:
        """The rest of the text at the end of generation (an incomplete character included)."""
        rest = self._decode(self.ids[self.prefix_offset :])
        self.text += rest[len(self._decode(self.ids[self.prefix_offset : self.read_offset])) :]
        self.prefix_offset = self.read_offset = len(self.ids)
        cut = self._find_stop(max(0, self.sent - self.longest_stop + 1))
        if cut is not None:
            self.text = self.text[:cut]
        return self._release(len(self.text))

    def _find_stop(self, searched_from: int) -> int | None:
        hits = [
            i
            for s in self.stop
            if (i := self.text.find(s, max(searched_from, self.stops_from - len(s) + 1))) >= 0
        ]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        tail = self.text[len(self.text) - self.longest_stop + 1 :] if self.longest_stop else ""
        for n in range(len(tail), 0, -1):
            if any(s.startswith(tail[-n:]) for s in self.stop):
                return n
        return 0

    def _release(self, upto: int) -> str:
        upto = max(upto, self.sent)
        out, self.sent = self.text[self.sent : upto], upto
        return out


# tokenizer -> {kept texts: the ids dropped}; a serving tokenizer's added tokens do not change
_DROPPED: weakref.WeakKeyDictionary[Any, dict[frozenset[str], frozenset[int]]] = (
    weakref.WeakKeyDictionary()
)


def _dropped_ids(tokenizer: Any, keep: Collection[str]) -> frozenset[int]:
    """The ids of the tokenizer's special tokens whose text is not in `keep`, read once per
    tokenizer: get_added_tokens_decoder builds every added token anew, ~0.1 ms with 258 of them
    (Llama 3 has 256 reserved ones), and each auto tool request's stream starts on the engine's
    step thread."""
    known = _DROPPED.setdefault(tokenizer, {})
    key = frozenset(keep)
    if key not in known:
        added = tokenizer.get_added_tokens_decoder()  # id -> AddedToken
        known[key] = frozenset(i for i, t in added.items() if t.special and t.content not in keep)
    return known[key]
