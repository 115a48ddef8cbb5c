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
    """The prefix trie of the tokens' bytes (tokens b"" left out), as flat arrays over node
    numbers (the root is 0): per node, its children by next byte, the ids of the tokens that
    are exactly its prefix, every id at or below it, and the bytes on the edges below it (the
    masker's shortcut). Flat and made of ints and tuples, the 100k+ nodes of a large vocabulary
    are not objects Python's garbage collector walks at every full collection (which, as
    per-node objects, cost the masker's first walks 10x their time)."""

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
        below = [0] * len(children)
        subtree: list[tuple[int, ...]] = [()] * len(children)
        for node in range(len(children) - 1, -1, -1):  # children are numbered after parents
            ids = list(ends[node])
            for b, child in children[node].items():
                below[node] |= (1 << b) | below[child]
                ids += subtree[child]
            subtree[node] = tuple(ids)
        self.children = children
        self.ids = [tuple(e) for e in ends]
        self.subtree_ids = subtree
        self.below = below
