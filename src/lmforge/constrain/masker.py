"""Which tokens may come next: a grammar's automaton walked over the vocabulary's byte trie.

A guide state is (automaton state, pending bytes): a token may end inside a UTF-8 character, and
the bytes of that unfinished character wait until the next token completes it (a partial
character is allowed only if some character the automaton can read starts with it). A mask is
computed by one walk of the trie that enters only the branches the automaton keeps alive, a whole
level of the trie at a time in numpy (guide states are rows of a byte table filled on demand, so
a level's step is one gather; the Python automaton runs only for (state, byte) pairs never seen),
and is cached per guide state: inside a JSON string or a `.*`, states repeat and the mask is a
lookup. Where a byte leaves the state as it is (a string's plain characters, a number's digits), a
subtree whose every byte does so is taken whole without walking it (its tokens are one range of
the trie's depth-first order): most of a vocabulary, inside a JSON string.
Stop tokens are not in the masks: the caller allows them exactly when `accepts` says so.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque

import numpy as np
import torch
from torch import Tensor

from lmforge.constrain.automaton import DEAD, Automaton
from lmforge.constrain.vocab import ByteTrie

GuideState = tuple[int, bytes]  # (automaton state, bytes of an unfinished character)
MASK_CACHE_BYTES = 8 << 20  # masks kept per guide: 160 of a 50k vocabulary, 2,048 of a 4k one
_UNKNOWN, _DEAD = -2, -1  # byte table entries: not computed yet; no answer goes on this way
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


# bytes a state's row rejects at its creation, without asking the automaton: those that start no
# UTF-8 character (a continuation, an overlong or out-of-range lead) and, after part of a
# character, those that do not continue it
_STARTS_NOTHING = np.array([_utf8_length(b) == 0 for b in range(256)])
_CONTINUES_NOTHING = np.array([not 0x80 <= b <= 0xBF for b in range(256)])


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
        # guide states interned as row numbers of `_table`: row i, byte b -> the row after it,
        # _DEAD or _UNKNOWN; filled on demand, so the walk's inner step is one array gather
        self._states: list[GuideState] = []
        self._index: dict[GuideState, int] = {}
        self._table = np.full((64, 256), _UNKNOWN, dtype=np.int32)
        # per row: bitmasks of the bytes 0-63 / 64-127 that keep the state (_loops_known: done)
        self._loops = np.zeros((64, 2), dtype=np.uint64)
        self._loops_known = np.zeros(64, dtype=bool)
        self._masks: OrderedDict[GuideState, Tensor] = OrderedDict()
        self._mask_cache = max(64, MASK_CACHE_BYTES // max(vocab.size, 1))

    def _row(self, at: GuideState) -> int:
        """The table row of a guide state (a new one gets a row of unknowns)."""
        i = self._index.get(at)
        if i is None:
            i = self._index[at] = len(self._states)
            self._states.append(at)
            if i == len(self._table):  # grow the per-row arrays twofold
                self._table = np.concatenate([self._table, np.full_like(self._table, _UNKNOWN)])
                self._loops = np.concatenate([self._loops, np.zeros_like(self._loops)])
                self._loops_known = np.concatenate(
                    [self._loops_known, np.zeros_like(self._loops_known)]
                )
            self._table[i, _CONTINUES_NOTHING if at[1] else _STARTS_NOTHING] = _DEAD
        return i

    def _step(self, i: int, b: int) -> int:
        """The row after byte b from row i (_DEAD when no answer can go on this way)."""
        out = int(self._table[i, b])
        if out == _UNKNOWN:
            nxt = self._next(self._states[i], b)
            out = _DEAD if nxt is None else self._row(nxt)
            self._table[i, b] = out
        return out

    def _steps(self, rows: np.ndarray, data: np.ndarray) -> np.ndarray:
        """_step for arrays of rows and bytes, the unknown pairs computed once each."""
        out = self._table[rows, data]
        unknown = out == _UNKNOWN
        if unknown.any():
            for pair in dict.fromkeys((rows[unknown] * 256 + data[unknown]).tolist()):
                self._step(pair >> 8, pair & 0xFF)
            out = self._table[rows, data]
        return out

    def _self_loops(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), 2) bitmasks of the bytes 0-63 and 64-127 after which each row's state is
        itself again (a byte of a multi-byte character always changes it: its pending bytes)."""
        for i in dict.fromkeys(rows[~self._loops_known[rows]].tolist()):
            pending = self._states[i][1]
            loops = 0 if pending else sum(1 << b for b in range(0x80) if self._step(i, b) == i)
            self._loops[i] = (loops & 0xFFFF_FFFF_FFFF_FFFF, loops >> 64)
            self._loops_known[i] = True
        return self._loops[rows]

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
        i = self._row(state)
        for b in data:
            i = self._step(i, b)
            if i == _DEAD:
                return None
        return self._states[i]

    def accepts(self, state: GuideState) -> bool:
        """Whether the answer may end here (the caller then allows its stop tokens)."""
        return not state[1] and self.automaton.accepts(state[0])

    def allowed(self, state: GuideState) -> Tensor:
        """Bool mask (vocab size,) of the tokens that may come next (stop tokens not included)."""
        mask = self._masks.get(state)
        if mask is not None:
            self._masks.move_to_end(state)
            return mask
        return self._cache_mask(state, self._walk(state))

    def has_mask(self, state: GuideState) -> bool:
        """Whether `state`'s mask is cached (`allowed` is then a lookup, not a walk)."""
        return state in self._masks

    def _cache_mask(self, state: GuideState, mask: Tensor) -> Tensor:
        self._masks[state] = mask
        if len(self._masks) > self._mask_cache:
            self._masks.popitem(last=False)
        return mask

    def warm(self, seconds: float) -> int:
        """Computes the masks of the states answers reach first (breadth first from the start)
        until `seconds` pass, none is left, or the mask cache is full; returns how many. For the
        compiling thread, before the guide is shared: a mask walk on the engine's thread
        delays every row of its step (docs/benchmarks.md)."""
        deadline = time.perf_counter() + seconds
        seen, todo = {self.start}, deque([self.start])
        while todo and len(self._masks) < self._mask_cache and time.perf_counter() < deadline:
            state = todo.popleft()
            successors: set[GuideState] = set()
            self._cache_mask(state, self._walk(state, successors))
            fresh = successors - seen
            seen |= fresh
            todo.extend(fresh)
        return len(self._masks)

    def allowed_ids(self, state: GuideState) -> list[int]:
        """The ids `allowed` marks, ascending."""
        return self.allowed(state).nonzero().flatten().tolist()

    def _walk(self, state: GuideState, successors: set | None = None) -> Tensor:
        """The mask of `state`, by a walk of the trie's live branches one level at a time (each
        level's edges stepped by one gather from the byte table); `successors`, when given, gets
        the states the allowed tokens lead to. A child whose state is its parent's, with every
        byte below it keeping that state, is taken whole: its subtree's range of trie.order."""
        trie = self.vocab.trie
        starts, stops = [], []  # ranges of trie.order allowed
        nodes = np.zeros(1, dtype=np.int64)
        rows = np.array([self._row(state)], dtype=np.int64)
        while nodes.size:
            degree = trie.degree[nodes]
            edges = np.repeat(trie.edge_start[nodes] - (np.cumsum(degree) - degree), degree)
            edges += np.arange(edges.size)
            parent = np.repeat(rows, degree)
            child = trie.edge_child[edges]
            after = self._steps(parent, trie.edge_byte[edges]).astype(np.int64)
            live = after != _DEAD
            parent, child, after = parent[live], child[live], after[live]
            whole = (after == parent) & ~trie.below_high[child]
            if whole.any():
                loops = self._self_loops(parent[whole])
                whole[whole] = ((trie.below_lo[child[whole]] & ~loops[:, 0]) == 0) & (
                    (trie.below_hi[child[whole]] & ~loops[:, 1]) == 0
                )
            first = trie.first[child]
            starts.append(first)
            stops.append(np.where(whole, trie.last[child], first + trie.ends[child]))
            if successors is not None:  # a whole subtree's tokens all lead to its parent's state
                ending = after[whole | (trie.ends[child] > 0)]
                successors.update(self._states[i] for i in set(ending.tolist()))
            deeper = ~whole & (trie.degree[child] > 0)
            nodes, rows = child[deeper], after[deeper]
        n = trie.order.size
        cover = np.bincount(np.concatenate(starts), minlength=n + 1)
        cover -= np.bincount(np.concatenate(stops), minlength=n + 1)
        mask = np.zeros(self.vocab.size, dtype=bool)
        mask[trie.order[np.cumsum(cover[:n]) > 0]] = True
        return torch.from_numpy(mask)
