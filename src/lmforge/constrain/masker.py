"""Which tokens may come next: a grammar's automaton walked over the vocabulary's byte trie.

A guide state is (automaton state, pending bytes): a token may end inside a UTF-8 character, and
the bytes of that unfinished character wait until the next token completes it (a partial
character is allowed only if some character the automaton can read starts with it). A mask is
computed by one walk of the trie that enters only the branches the automaton keeps alive, and is
cached per guide state: inside a JSON string or a `.*`, states repeat and the mask is a lookup.
Where a byte leaves the state as it is (a string's plain characters, a number's digits), a
subtree whose every byte does so is taken whole without walking it: most of a vocabulary, inside
a JSON string.
Stop tokens are not in the masks: the caller allows them exactly when `accepts` says so.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque

import torch
from torch import Tensor

from lmforge.constrain.automaton import DEAD, Automaton
from lmforge.constrain.vocab import ByteTrie

GuideState = tuple[int, bytes]  # (automaton state, bytes of an unfinished character)
MASK_CACHE_BYTES = 8 << 20  # masks kept per guide: 160 of a 50k vocabulary, 2,048 of a 4k one
_MISS = object()  # not computed yet (None is a computed answer: dead)
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
        self.trie = ByteTrie(tokens)


class TokenGuide:
    """One grammar over one vocabulary: start state, masks, and the step a token makes."""

    def __init__(self, automaton: Automaton, vocab: Vocabulary) -> None:
        self.automaton = automaton
        self.vocab = vocab
        self.start: GuideState = (automaton.start, b"")
        # guide state -> {byte: the state after it, or None}: the walk's inner loop is a lookup
        self._rows: dict[GuideState, dict[int, GuideState | None]] = {}
        self._loops: dict[GuideState, int] = {}  # bitmask of the ASCII bytes that keep the state
        self._masks: OrderedDict[GuideState, Tensor] = OrderedDict()
        self._mask_cache = max(64, MASK_CACHE_BYTES // max(vocab.size, 1))

    def _row(self, at: GuideState) -> dict[int, GuideState | None]:
        row = self._rows.get(at)
        if row is None:
            row = self._rows[at] = {}
        return row

    def _self_loops(self, at: GuideState) -> int:
        """Bitmask of the ASCII bytes after which the guide state is `at` again (a byte of a
        multi-byte character always changes it: its pending bytes)."""
        loops = self._loops.get(at)
        if loops is None:
            loops = self._loops[at] = sum(
                1 << b for b in range(0x80) if not at[1] and self._byte(at, b) == at
            )
        return loops

    def _byte(self, at: GuideState, b: int) -> GuideState | None:
        """The guide state after one more byte, or None when no answer can go on this way."""
        row = self._row(at)
        out = row.get(b, _MISS)
        if out is _MISS:
            out = row[b] = self._next(at, b)
        return out  # type: ignore[return-value]

    def _next(self, at: GuideState, b: int) -> GuideState | None:
        state, pending = at
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
        return out

    def advance(self, state: GuideState, token_id: int) -> GuideState | None:
        """The state after `token_id`, or None when the grammar does not allow it there."""
        data = self.vocab.tokens[token_id] if 0 <= token_id < self.vocab.size else b""
        if not data:
            return None
        current: GuideState | None = state
        for b in data:
            current = self._byte(current, b)
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
        return self._cache_mask(state, self.allowed_ids(state))

    def _cache_mask(self, state: GuideState, ids: list[int]) -> Tensor:
        mask = torch.zeros(self.vocab.size, dtype=torch.bool)
        if ids:
            mask[torch.tensor(ids, dtype=torch.long)] = True
        self._masks[state] = mask
        if len(self._masks) > self._mask_cache:
            self._masks.popitem(last=False)
        return mask

    def warm(self, seconds: float) -> int:
        """Computes the masks of the states answers reach first (breadth first from the start)
        until `seconds` pass, none is left, or the mask cache is full; returns how many. For the
        compiling thread, before the guide is shared: a mask walk on the engine's thread
        delays every row of its step (33-49 ms a new state at 50k tokens, docs/benchmarks.md)."""
        deadline = time.perf_counter() + seconds
        seen, todo = {self.start}, deque([self.start])
        while todo and len(self._masks) < self._mask_cache and time.perf_counter() < deadline:
            state = todo.popleft()
            successors: set[GuideState] = set()
            self._cache_mask(state, self.allowed_ids(state, successors))
            fresh = successors - seen
            seen |= fresh
            todo.extend(fresh)
        return len(self._masks)

    def allowed_ids(self, state: GuideState, successors: set | None = None) -> list[int]:
        """The ids `allowed` marks, by one walk of the live branches of the trie; `successors`,
        when given, gets the states those tokens lead to."""
        trie = self.vocab.trie
        children, ends, subtree, below = trie.children, trie.ids, trie.subtree_ids, trie.below
        ids: list[int] = []
        todo = [(0, state)]
        while todo:
            node, at = todo.pop()
            row = self._row(at)
            for b, child in children[node].items():
                nxt = row.get(b, _MISS)
                if nxt is _MISS:
                    nxt = row[b] = self._next(at, b)
                if nxt is None:
                    continue
                if nxt == at and not below[child] & ~self._self_loops(at):  # all stays here
                    ids += subtree[child]
                    continue
                ids += ends[child]
                if successors is not None and ends[child]:
                    successors.add(nxt)
                if children[child]:
                    todo.append((child, nxt))
        return ids
