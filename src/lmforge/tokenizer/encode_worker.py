"""The per-process half of the tokens stage: JSON lines in, packed token bytes out.

Each worker process loads the encoder once (init_worker) and then turns batches of raw JSON
lines into the ids of each document followed by eos, packed as bytes of the shard's dtype. The
encoder is HF tokenizers, or tiktoken built from the same BPE where that gives the same ids
(fast_bpe.py; encode.py decides which, once, for the whole stage).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from itertools import chain
from typing import Any, Literal

import numpy as np

from lmforge.errors import InputError

Batch = tuple[str, int, list[str]]  # (file name, first line number, raw JSON lines)
Encoder = Literal["hf", "tiktoken"]
BatchEncode = Callable[[list[str]], list[list[int]]]
_STATE: dict[str, Any] = {}  # per process: the batch encoder, eos id and dtype


def load_encoder(tokenizer_json: str, encoder: Encoder, threads: int | None) -> BatchEncode:
    """texts -> ids of each, document text encoded as text (special-token strings included).

    threads (HF only): None = every core in Rust threads, 1 = this thread; tiktoken always
    runs on the calling thread."""
    if encoder == "tiktoken":
        from lmforge.tokenizer.fast_bpe import tiktoken_encoding

        enc = tiktoken_encoding(tokenizer_json)
        # one thread: tiktoken's thread pool (a future per document) measured slower than this
        # loop on 2 cores (docs/benchmarks.md); processes are the way to use more cores
        return lambda texts: [enc.encode_ordinary(text) for text in texts]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_json)
    tok.encode_special_tokens = True  # document text is text, never control tokens
    # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we do not need
    batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
    return lambda texts: [enc.ids for enc in batch(texts, add_special_tokens=False)]


def init_worker(
    tokenizer_json: str, eos_id: int, dtype: str, encoder: Encoder, threads: int | None
) -> None:
    """Loads the encoder once per process; threads=1 in pool workers (the pool is the
    parallelism), None in-process (the encoder then uses every core itself)."""
    if threads is not None:
        os.environ["RAYON_NUM_THREADS"] = str(threads)
    encode = load_encoder(tokenizer_json, encoder, threads)
    _STATE.update(encode=encode, eos=eos_id, dtype=np.dtype(dtype))


def document_text(name: str, line_no: int, line: str) -> str:
    """The 'text' of one raw JSON line, or an InputError naming the file and line."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"{name} line {line_no}: not valid JSON ({err.msg})") from None
    text = row.get("text") if isinstance(row, dict) else None
    if not isinstance(text, str):
        raise InputError(f"{name} line {line_no}: expected a JSON object with a string 'text'")
    return text


def check_encodable(name: str, first: int, texts: list[str]) -> None:
    """A lone surrogate (a JSON "\\ud800" escape) is not text either encoder can take: HF raises
    a TypeError, tiktoken silently replaces it; both paths stop here with the line instead."""
    try:
        "".join(texts).encode("utf-8")
    except UnicodeEncodeError:
        for i, text in enumerate(texts):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise InputError(
                    f"{name} line {first + i}: text holds a lone surrogate "
                    f"({text[err.start]!r}), which is not valid unicode"
                ) from None


def encode_lines(batch: Batch) -> tuple[bytes, int]:
    """JSON lines -> (ids of each document followed by eos, as bytes; number of documents)."""
    name, first, lines = batch
    texts = [document_text(name, first + i, line) for i, line in enumerate(lines)]
    check_encodable(name, first, texts)
    encoded = _STATE["encode"](texts)
    eos = [_STATE["eos"]]
    ids = np.fromiter(
        chain.from_iterable(doc + eos for doc in encoded),
        dtype=_STATE["dtype"],
        count=sum(len(doc) + 1 for doc in encoded),
    )
    return ids.tobytes(), len(lines)
