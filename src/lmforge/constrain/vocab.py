"""A tokenizer's vocabulary as bytes, in a prefix trie the token masker walks.

Each token's bytes are what it adds to the answer: for a byte-level BPE (GPT-2's alphabet, what
lmforge trains) its symbols mapped back to bytes, so a token may hold part of a UTF-8 character;
otherwise the text it adds after an anchor token (decode([anchor, id]) minus decode([anchor]),
which keeps a SentencePiece word's leading space), tokens that decode to an incomplete character
left out. (Decoding drops the space of a SentencePiece answer's first piece; here it counts, so a
grammar that cannot start with a space, JSON's, starts with the pieces that carry none.) Special tokens, and tokens that add nothing, are never allowed by a constraint: an
empty token could repeat forever without advancing it.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import numpy as np


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode table, inverted: symbol -> byte."""
    # imported here: fast_bpe pulls in the tokenizer stage (pydantic, artifacts), which a
    # constraint compiled in the server need not load until it meets a byte-level vocabulary
    from lmforge.tokenizer.fast_bpe import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def _is_byte_level(tokenizer: Any) -> bool:
    decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(p.get("type") == "ByteLevel" for p in parts)


def token_bytes(tokenizer: Any) -> list[bytes]:
    """Every token id's bytes (b"" for tokens a constraint never allows)."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    added = tokenizer.get_added_tokens_decoder()
    out: list[bytes] = [b""] * size
    if _is_byte_level(tokenizer):
        table = _byte_decoder()
        for i in range(size):
            token = tokenizer.id_to_token(i)
            if token is None or (i in added and added[i].special):
                continue
            if i in added or any(ch not in table for ch in token):  # added text is plain text
                out[i] = token.encode("utf-8")
            else:
                out[i] = bytes(table[ch] for ch in token)
        return out
    anchor = next(i for i in range(size) if i not in added)
    base = tokenizer.decode([anchor], skip_special_tokens=True)
    for i in range(size):
        if i in added and added[i].special:
            continue
        text = tokenizer.decode([anchor, i], skip_special_tokens=True)
        if text.startswith(base) and "\ufffd" not in text[len(base) :]:
            out[i] = text[len(base) :].encode("utf-8")
    return out


class ByteTrie:
    """The prefix trie of the tokens' bytes (tokens b"" left out), as numpy arrays over node
    numbers (the root is 0, children numbered after their parents) that the masker walks a
    whole level at a time: each node's edges (`edge_start`, `degree`; per edge its `edge_byte`
    and `edge_child`), and the token ids in depth-first order (`order`), so that the tokens that
    are exactly a node's prefix are order[first:first + ends] and every token at or below it is
    order[first:last]. The bytes on the edges below a node, as bitmasks of bytes 0-63
    (`below_lo`) and 64-127 (`below_hi`) and a flag for any byte >= 0x80 (`below_high`), are the
    masker's whole-subtree shortcut. Flat arrays, the 100k+ nodes of a large vocabulary are not
    objects Python's garbage collector walks (as per-node objects they cost the masker's first
    walks 10x their time)."""

    def __init__(self, tokens: list[bytes]) -> None:
        children: list[dict[int, int]] = [{}]
        ends: list[list[int]] = [[]]
        for token_id, data in enumerate(tokens):
            node = 0
            for b in data:
                child = children[node].get(b)
                if child is None:
                    child = children[node][b] = len(children)
                    children.append({})
                    ends.append([])
                node = child
            if data:
                ends[node].append(token_id)
        n = len(children)
        below, count = [0] * n, [0] * n
        for node in range(n - 1, -1, -1):  # children before their parents
            count[node] = len(ends[node])
            for b, child in children[node].items():
                below[node] |= (1 << b) | below[child]
                count[node] += count[child]
        first = [0] * n
        order = np.empty(count[0], dtype=np.int64)
        for node in range(n):  # parents before their children
            pos = first[node]
            order[pos : pos + len(ends[node])] = ends[node]
            pos += len(ends[node])
            for child in children[node].values():
                first[child] = pos
                pos += count[child]
        self.degree = np.array([len(c) for c in children], dtype=np.int64)
        self.edge_start = np.cumsum(self.degree) - self.degree
        self.edge_byte = np.array([b for c in children for b in c], dtype=np.int64)
        self.edge_child = np.array([x for c in children for x in c.values()], dtype=np.int64)
        self.order = order
        self.first = np.array(first, dtype=np.int64)
        self.ends = np.array([len(e) for e in ends], dtype=np.int64)
        self.last = self.first + np.array(count, dtype=np.int64)
        low64 = (1 << 64) - 1
        self.below_lo = np.array([b & low64 for b in below], dtype=np.uint64)
        self.below_hi = np.array([(b >> 64) & low64 for b in below], dtype=np.uint64)
        self.below_high = np.array([b >> 128 != 0 for b in below], dtype=bool)
