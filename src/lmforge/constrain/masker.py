"""Which tokens may come next: a grammar's automaton walked over the vocabulary's byte trie.

A guide state is (automaton state, pending bytes): a token may end inside a UTF-8 character, and
the bytes of that unfinished character wait until the next token completes it (a partial
character is allowed only if some character the automaton can read starts with it). A mask is
computed by one walk of the trie that enters only the branches the automaton keeps alive, and is
cached per guide state: inside a JSON string or a `.*`, states repeat and the mask is a lookup.
Stop tokens are not in the masks: the caller allows them exactly when `accepts` says so.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

from lmforge.constrain.automaton import DEAD, Automaton
from lmforge.constrain.vocab import TrieNode, build_trie

GuideState = tuple[int, bytes]  # (automaton state, bytes of an unfinished character)
MASK_CACHE = 512  # masks kept per guide (a 50k vocabulary's mask is 50 KB)
_MIN_CODE = {2: 0x80, 3: 0x800, 4: 0x10000}  # below: an overlong encoding


def _utf8_length(lead: int) -> int:
    """Bytes in a character that starts with `lead` (0: not a valid lead byte)."""
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def _code_ranges(partial: bytes, length: int) -> list[tuple[int, int]]:
    """The code points whose UTF-8 encoding (of `length` bytes) starts with `partial`, as
    ranges: none below the length's minimum (overlong), above U+10FFFF, or surrogates."""
    value = partial[0] & (0x7F >> length)
    for b in partial[1:]:
        value = (value << 6) | (b & 0x3F)
    rest = 6 * (length - len(partial))
    lo, hi = (
        max(value << rest, _MIN_CODE[length]),
        min((value << rest) | ((1 << rest) - 1), 0x10FFFF),
    )
    ranges = [(lo, min(hi, 0xD7FF)), (max(lo, 0xE000), hi)]
    return [(a, b) for a, b in ranges if a <= b]


class Vocabulary:
    """Token bytes (id -> bytes; b"" = never allowed) and their prefix trie."""

    def __init__(self, tokens: list[bytes]) -> None:
        self.tokens = tokens
        self.size = len(tokens)
        self.trie: TrieNode = build_trie(tokens)


class TokenGuide:
    """One grammar over one vocabulary: start state, masks, and the step a token makes."""

    def __init__(self, automaton: Automaton, vocab: Vocabulary) -> None:
        self.automaton = automaton
        self.vocab = vocab
        self.start: GuideState = (automaton.start, b"")
        self._bytes: dict[tuple[int, bytes, int], GuideState | None] = {}
        self._masks: OrderedDict[GuideState, Tensor] = OrderedDict()

    def _byte(self, state: int, pending: bytes, b: int) -> GuideState | None:
        """The guide state after one more byte, or None when no answer can go on this way."""
        key = (state, pending, b)
        if key in self._bytes:
            return self._bytes[key]
        out: GuideState | None = None
        data = pending + bytes((b,))
        length = _utf8_length(data[0])
        if b < 0x80 and not pending:
            nxt = self.automaton.step(state, chr(b))
            out = None if nxt == DEAD else (nxt, b"")
        elif length and all(0x80 <= c <= 0xBF for c in data[1:]):
            if len(data) < length:
                meets = self.automaton.meets
                ok = any(meets(state, lo, hi) for lo, hi in _code_ranges(data, length))
                out = (state, data) if ok else None
            else:
                try:
                    ch = data.decode("utf-8")
                except UnicodeDecodeError:
                    ch = ""
                nxt = self.automaton.step(state, ch) if ch else DEAD
                out = None if nxt == DEAD else (nxt, b"")
        self._bytes[key] = out
        return out

    def advance(self, state: GuideState, token_id: int) -> GuideState | None:
        """The state after `token_id`, or None when the grammar does not allow it there."""
        data = self.vocab.tokens[token_id] if 0 <= token_id < self.vocab.size else b""
        if not data:
            return None
        current: GuideState | None = state
        for b in data:
            current = self._byte(current[0], current[1], b)
            if current is None:
                return None
        return current

    def accepts(self, state: GuideState) -> bool:
        """Whether the answer may end here (the caller then allows its stop tokens)."""
        return not state[1] and self.automaton.accepts(state[0])

    def allowed(self, state: GuideState) -> Tensor:
        """Bool mask (vocab size,) of the tokens that may come next (stop tokens not included)."""
        mask = self._masks.get(state)
        if mask is not None:
            self._masks.move_to_end(state)
            return mask
        mask = torch.zeros(self.vocab.size, dtype=torch.bool)
        ids = self.allowed_ids(state)
        if ids:
            mask[torch.tensor(ids, dtype=torch.long)] = True
        self._masks[state] = mask
        if len(self._masks) > MASK_CACHE:
            self._masks.popitem(last=False)
        return mask

    def allowed_ids(self, state: GuideState) -> list[int]:
        """The ids `allowed` marks, by one walk of the live branches of the trie."""
        ids: list[int] = []
        todo = [(self.vocab.trie, state[0], state[1])]
        step = self._byte
        while todo:
            node, s, pending = todo.pop()
            for b, child in node.items():
                if b is None:
                    continue
                nxt = step(s, pending, b)
                if nxt is None:
                    continue
                here = child.get(None)
                if here is not None:
                    ids += here
                if len(child) > (here is not None):
                    todo.append((child, nxt[0], nxt[1]))
        return ids
