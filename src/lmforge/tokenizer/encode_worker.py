"""The per-process half of the tokens stage: JSON lines in, packed token bytes out.

Each worker process loads the tokenizer once (init_worker) and then turns batches of raw JSON
lines into the ids of each document followed by eos, packed as bytes of the shard's dtype.
"""

from __future__ import annotations

import json
import os
from itertools import chain
from typing import Any

import numpy as np

from lmforge.errors import InputError

Batch = tuple[str, int, list[str]]  # (file name, first line number, raw JSON lines)
_STATE: dict[str, Any] = {}  # per process: the tokenizer, eos id and dtype


def init_worker(tokenizer_json: str, eos_id: int, dtype: str, threads: int | None) -> None:
    """Loads the tokenizer once per process; threads=1 in pool workers (the pool is the
    parallelism), None in-process (the Rust tokenizer then uses every core itself)."""
    if threads is not None:
        os.environ["RAYON_NUM_THREADS"] = str(threads)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_json)
    tok.encode_special_tokens = True  # document text is text, never control tokens
    _STATE.update(tok=tok, eos=eos_id, dtype=np.dtype(dtype))


def _document_text(name: str, line_no: int, line: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"{name} line {line_no}: not valid JSON ({err.msg})") from None
    text = row.get("text") if isinstance(row, dict) else None
    if not isinstance(text, str):
        raise InputError(f"{name} line {line_no}: expected a JSON object with a string 'text'")
    return text


def encode_lines(batch: Batch) -> tuple[bytes, int]:
    """JSON lines -> (ids of each document followed by eos, as bytes; number of documents)."""
    name, first, lines = batch
    texts = [_document_text(name, first + i, line) for i, line in enumerate(lines)]
    tok = _STATE["tok"]
    # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we do not need
    encodings = getattr(tok, "encode_batch_fast", tok.encode_batch)(texts, add_special_tokens=False)
    eos = [_STATE["eos"]]
    ids = np.fromiter(
        chain.from_iterable(enc.ids + eos for enc in encodings),
        dtype=_STATE["dtype"],
        count=sum(len(enc.ids) + 1 for enc in encodings),
    )
    return ids.tobytes(), len(lines)
