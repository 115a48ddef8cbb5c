"""The `tokens` stage: encode the data splits into flat token memmaps for pretraining.

Each split becomes one `<split>.bin` of uint16 (when the vocabulary fits) or uint32 ids, with an
eos token after every document, plus meta.json recording the dtype, counts and the tokenizer's
hash (pretraining refuses shards made with another tokenizer). Documents are read in batches and
encoded with the Rust tokenizer's `encode_batch_fast`, which uses every core; output order equals
input order, so the shards are deterministic. Memory stays flat: batches are written as they come.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from lmforge.artifacts import StageContext, require_artifact, run_stage
from lmforge.common.io import read_jsonl
from lmforge.config import NOT_HASHED, StageConfig
from lmforge.errors import InputError
from lmforge.tokenizer.files import TOKENIZER_HINT, TokenizerFiles, tokenizer_hash

DATA_HINT = "lmforge data prepare --source stdlib-docs --out DIR"
SPLITS = ("train", "val", "test")


class EncodeConfig(StageConfig):
    """`lmforge tokenizer encode --data DIR --tokenizer DIR --out DIR`."""

    data: Path = Field(description="data stage directory ({train,val,test}.jsonl.zst)")
    tokenizer: Path = Field(description="tokenizer directory (tokenizer.json)")
    batch_docs: int = Field(
        1024, ge=1, description="documents per encode_batch call", json_schema_extra=NOT_HASHED
    )
    workers: int = Field(
        0, ge=0, description="tokenizer threads (0 = all cores)", json_schema_extra=NOT_HASHED
    )

    def inputs(self) -> list[Path]:
        return [self.data, self.tokenizer]


def encode(cfg: EncodeConfig, force: bool = False) -> Path:
    """Runs (or reuses) the tokens stage; returns the shard directory."""
    return run_stage("tokens", cfg, build, force=force).out


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the shards' size whenever every id fits in it."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _batches(path: Path, size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for row in read_jsonl(path):
        batch.append(row.get("text", ""))
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def encode_split(
    files: TokenizerFiles,
    source: Path,
    dest: Path,
    dtype: np.dtype,
    batch_docs: int,
    ctx: StageContext,
) -> tuple[int, int]:
    """Encodes one split into dest atomically; returns (tokens, documents)."""
    eos = files.eos_id
    # encode_batch_fast (tokenizers >= 0.21) skips character offsets, which shards never use:
    # same ids, ~20% faster (benchmarks/bench_tokenizer.py).
    encode_batch = getattr(files.tokenizer, "encode_batch_fast", files.tokenizer.encode_batch)
    n_tokens = n_docs = 0
    with (
        ctx.atomic_path(dest) as tmp,
        open(tmp, "wb") as fh,
        ctx.progress(f"encode {source.stem.split('.')[0]}", unit="doc") as bar,
    ):
        for batch in _batches(source, batch_docs):
            encodings = encode_batch(batch, add_special_tokens=False)
            ids: list[int] = []
            for enc in encodings:
                ids.extend(enc.ids)
                ids.append(eos)
            array = np.asarray(ids, dtype=dtype)
            fh.write(array.tobytes())
            n_tokens += len(array)
            n_docs += len(batch)
            bar.advance(len(batch))
            bar.update(tokens=n_tokens)
    return n_tokens, n_docs


def build(cfg: EncodeConfig, ctx: StageContext) -> dict[str, Any]:
    require_artifact(cfg.data, ["train.jsonl.zst", "val.jsonl.zst"], hint=DATA_HINT)
    require_artifact(cfg.tokenizer, ["tokenizer.json"], hint=TOKENIZER_HINT)
    if cfg.workers:
        os.environ["RAYON_NUM_THREADS"] = str(cfg.workers)
    files = TokenizerFiles.load(cfg.tokenizer)
    if files.eos_id is None:
        raise InputError(
            f"{cfg.tokenizer} defines no eos_token in tokenizer_config.json; documents need an "
            "eos between them (retrain with lmforge tokenizer train, or add eos_token)"
        )
    dtype = token_dtype(files.vocab_size)
    counts: dict[str, int] = {}
    documents: dict[str, int] = {}
    for split in SPLITS:
        source = Path(cfg.data) / f"{split}.jsonl.zst"
        if source.exists():
            counts[split], documents[split] = encode_split(
                files, source, ctx.out / f"{split}.bin", dtype, cfg.batch_docs, ctx
            )
    if not counts.get("train"):
        raise InputError(
            f"{cfg.data}/train.jsonl.zst holds no documents; check the data funnel "
            f"(lmforge data stats {cfg.data}) and loosen the filters that removed them"
        )
    meta = {
        "dtype": dtype.name,
        "vocab_size": files.vocab_size,
        "tokenizer_hash": tokenizer_hash(cfg.tokenizer),
        "eos_id": files.eos_id,
        "bos_id": files.bos_id,
        "counts": counts,
        "documents": documents,
    }
    ctx.atomic_write_json(ctx.out / "meta.json", meta)
    return {
        "train_tokens": counts.get("train", 0),
        "val_tokens": counts.get("val", 0),
        "dtype": dtype.name,
    }
