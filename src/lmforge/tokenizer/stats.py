"""How good a tokenizer is on held-out text: the numbers the manifest and the report show.

bytes/token says how much text one token carries (higher = cheaper training per byte),
tokens/word how finely words are split, the unknown rate how much text the vocabulary cannot
represent (always 0 for byte-level BPE), and the longest tokens are a quick sanity check.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lmforge.tokenizer.files import TokenizerFiles


def tokenizer_stats(
    files: TokenizerFiles, texts: Iterable[str], batch: int = 512
) -> dict[str, Any]:
    """Encodes texts and returns bytes_per_token, tokens_per_word, unk_rate, longest_tokens."""
    tok = files.tokenizer
    unk_id = files.token_id(files.special.get("unk_token"))
    n_bytes = n_tokens = n_words = n_unk = 0
    pending: list[str] = []

    def flush() -> None:
        nonlocal n_tokens, n_unk
        for enc in tok.encode_batch(pending, add_special_tokens=False):
            n_tokens += len(enc.ids)
            if unk_id is not None:
                n_unk += sum(1 for i in enc.ids if i == unk_id)
        pending.clear()

    plain = tok.encode_special_tokens
    tok.encode_special_tokens = True  # documents are text, as the tokens stage encodes them
    try:
        for text in texts:
            n_bytes += len(text.encode("utf-8"))
            n_words += len(text.split())
            pending.append(text)
            if len(pending) >= batch:
                flush()
        flush()
    finally:
        tok.encode_special_tokens = plain
    specials = set(files.special.values())
    decoded = {i: tok.decode([i]) for t, i in tok.get_vocab().items() if t not in specials}
    longest = sorted(decoded, key=lambda i: (-len(decoded[i]), i))[:10]
    return {
        "val_bytes": n_bytes,
        "val_tokens": n_tokens,
        "bytes_per_token": round(n_bytes / n_tokens, 4) if n_tokens else None,
        "tokens_per_word": round(n_tokens / n_words, 4) if n_words else None,
        "unk_rate": round(n_unk / n_tokens, 6) if n_tokens else None,
        "longest_tokens": [decoded[i] for i in longest],
    }
