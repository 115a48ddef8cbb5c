"""The `tokens` stage: encode the data splits into flat token memmaps for pretraining.

Each split becomes one `<split>.bin` of uint16 (when the vocabulary fits) or uint32 ids, with an
eos token after every document, plus meta.json recording the dtype, counts and the tokenizer's
hash (pretraining refuses shards made with another tokenizer).

Parallelism: the main process only decompresses and hands batches of raw JSON lines to worker
processes, which parse them, encode and return packed token bytes; results are written in
submission order, so the shards are byte-identical for any number of workers. At most a few
batches are in flight, so memory stays flat however large the corpus. Document text is encoded
as plain text (a document that spells "<|endoftext|>" gets byte tokens, not a fake eos).

Encoder: lmforge's own byte-level BPE is encoded by tiktoken (1.5x HF tokenizers on the stage,
docs/benchmarks.md) when fast_bpe.py finds it exactly representable and a sample of the corpus
plus a fixed set of tricky strings encodes to the same ids both ways; otherwise, and for every
other tokenizer, by HF tokenizers. The choice is made once per stage and recorded in the
manifest's metrics (`encoder`); the shards are the same bytes either way.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections import deque
from collections.abc import Iterator
from itertools import chain, islice
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from lmforge.artifacts import StageContext, require_artifact, run_stage
from lmforge.common.io import open_text
from lmforge.common.threads import usable_cpus
from lmforge.config import NOT_HASHED, StageConfig
from lmforge.errors import InputError
from lmforge.tokenizer import encode_worker
from lmforge.tokenizer.encode_worker import Batch, Encoder, document_text, encode_lines, init_worker
from lmforge.tokenizer.fast_bpe import NotExact
from lmforge.tokenizer.files import TOKENIZER_HINT, TokenizerFiles, tokenizer_hash

DATA_HINT = "lmforge data prepare --source stdlib-docs --out DIR"
SPLITS = ("train", "val", "test")
SAMPLE_DOCS = 2000  # documents of the train split encoded both ways before trusting tiktoken
SAMPLE_CHARS = 2_000_000  # ... or fewer, when they are long
# Strings where a regex or merge-order mismatch would show first: special-token spellings,
# digits against spaces, whitespace runs, contractions, scripts and marks the regexes classify.
TRICKY = (
    "<|endoftext|> <|im_start|>user\nhi<|im_end|>\n<|pad|><|unk|>",
    "a  1 \t2\n\n 3   x 12345 6.5e-3 ½ ² ٣ Ⅻ",
    "  lead\ttab\r\nCRLF \n\n\n   \u00a0nbsp\u2003em\u3000ideo  ",
    "it's I'M we'LL they'd O'Neil 's 'S ſ K",
    "naïve cafe\u0301 e\u0301\u0301 \u0645\u0631\u062d\u0628\u0627 \u05e9\u05dc\u05d5\u05dd",
    "汉字かなカナ한국어 🙂👍🏽👨‍👩‍👧 \u200d\u200b\ufeff",
    "def f(x):\n    return x**2  # comment\n\n\nclass A:\n\tpass\n",
    "a" * 3000 + " " + "ab" * 500 + "\n" * 40 + " " * 40 + "!" * 40,
)
log = logging.getLogger(__name__)


class EncodeConfig(StageConfig):
    """`lmforge tokenizer encode --data DIR --tokenizer DIR --out DIR`."""

    data: Path = Field(description="data stage directory ({train,val,test}.jsonl.zst)")
    tokenizer: Path = Field(description="tokenizer directory (tokenizer.json)")
    batch_docs: int = Field(
        1024, ge=1, description="documents per worker task", json_schema_extra=NOT_HASHED
    )
    workers: int = Field(
        0,
        ge=0,
        description="encoding processes (0 = auto: 1 on <= 2 cores, else one per core; "
        "1 = in this process: HF's Rust encoder still uses every core, tiktoken one)",
        json_schema_extra=NOT_HASHED,
    )
    encoder: Literal["auto", "hf"] = Field(
        "auto",
        description="auto = tiktoken for lmforge's byte-level BPE when it gives HF's exact ids "
        "(checked on a sample), else HF tokenizers; hf = always HF tokenizers",
        json_schema_extra=NOT_HASHED,
    )

    def inputs(self) -> list[Path]:
        return [self.data, self.tokenizer]


def encode(cfg: EncodeConfig, force: bool = False) -> Path:
    """Runs (or reuses) the tokens stage; returns the shard directory."""
    return run_stage("tokens", cfg, build, force=force).out


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the shards' size whenever every id fits in it."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def line_batches(path: Path, size: int) -> Iterator[Batch]:
    """Raw non-empty JSON lines of a .jsonl[.zst|.gz] file, `size` at a time, with line numbers."""
    batch: list[str] = []
    first = 1
    with open_text(path) as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            if not batch:
                first = line_no
            batch.append(line)
            if len(batch) >= size:
                yield path.name, first, batch
                batch = []
    if batch:
        yield path.name, first, batch


def resolve_workers(requested: int) -> int:
    """0 = auto: one process on machines of up to two cores, where worker processes measured
    slower with either encoder (docs/benchmarks.md); else one per core,
    which also spreads JSON parsing and packing, the serial part of the one-process path."""
    if requested:
        return requested
    cores = usable_cpus()
    return 1 if cores <= 2 else cores


class ShardEncoder:
    """Maps batches to token bytes in order: in this process for a small split or one worker,
    else in a pool of processes started on first need and shared by every split."""

    def __init__(
        self, files: TokenizerFiles, dtype: np.dtype, encoder: Encoder, workers: int
    ) -> None:
        path = str(Path(files.path, "tokenizer.json").resolve())
        self.args = (path, files.eos_id, dtype.name, encoder)
        self.workers = workers
        self.pool: Any = None
        self.local = False

    def map(self, batches: Iterator[Batch]) -> Iterator[tuple[bytes, int]]:
        head = list(islice(batches, 2))  # a split of one batch is not worth starting processes
        batches = chain(head, batches)
        if self.workers == 1 or len(head) < 2:
            if not self.local:
                init_worker(*self.args, threads=None)
                self.local = True
            return map(encode_lines, batches)
        if self.pool is None:
            spawn = multiprocessing.get_context("spawn")  # no fork of a threaded tokenizer
            self.pool = spawn.Pool(self.workers, initializer=init_worker, initargs=(*self.args, 1))
        return self._ordered(batches, depth=2 * self.workers)

    def _ordered(self, batches: Iterator[Batch], depth: int) -> Iterator[tuple[bytes, int]]:
        """pool.imap with back-pressure: at most `depth` batches read ahead, results in order."""
        pending: deque[Any] = deque()
        for batch in batches:
            pending.append(self.pool.apply_async(encode_lines, (batch,)))
            if len(pending) >= depth:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def __enter__(self) -> ShardEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def sample_texts(source: Path, limit: int = SAMPLE_DOCS) -> list[tuple[str, str]]:
    """(where, text) of the first `limit` documents of a split (at most SAMPLE_CHARS of text)."""
    sample: list[tuple[str, str]] = []
    chars = 0
    for name, first, lines in line_batches(source, 256):
        for i, line in enumerate(lines):
            text = document_text(name, first + i, line)
            sample.append((f"{name} line {first + i}", text))
            chars += len(text)
            if len(sample) >= limit or chars >= SAMPLE_CHARS:
                return sample
    return sample


def choose_encoder(cfg: EncodeConfig, tokenizer_json: Path) -> Encoder:
    """tiktoken when the tokenizer is exactly representable and the first documents of the
    train split plus TRICKY encode to the same ids as HF; else (and on request) HF."""
    if cfg.encoder == "hf":
        return "hf"
    try:
        fast = encode_worker.load_encoder(str(tokenizer_json), "tiktoken", None)
    except NotExact as why:
        log.info("encoding with HF tokenizers: tiktoken cannot be exact here (%s)", why)
        return "hf"
    sample = sample_texts(Path(cfg.data) / "train.jsonl.zst")
    sample += [(f"built-in check string {i}", text) for i, text in enumerate(TRICKY)]
    texts = [text for _, text in sample]
    try:
        want_ids = encode_worker.load_encoder(str(tokenizer_json), "hf", None)(texts)
    except TypeError:  # HF's answer to a lone surrogate: the stage names its line later
        return "hf"
    got_ids = fast(texts)
    for (where, _), want, got in zip(sample, want_ids, got_ids, strict=True):
        if want != got:
            at = next(
                (i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b),
                min(len(want), len(got)),
            )
            log.warning(
                "tiktoken and HF tokenizers differ on %s (from token %d: HF %s, tiktoken %s); "
                "encoding the whole stage with HF tokenizers",
                *(where, at, want[at : at + 5], got[at : at + 5]),
            )
            return "hf"
    log.info("encoding with tiktoken: same ids as HF tokenizers on %d sample texts", len(sample))
    return "tiktoken"


def encode_split(
    encoder: ShardEncoder, source: Path, dest: Path, cfg: EncodeConfig, ctx: StageContext
) -> tuple[int, int]:
    """Encodes one split into dest atomically; returns (tokens, documents)."""
    itemsize = np.dtype(encoder.args[2]).itemsize
    n_tokens = n_docs = 0
    with (
        ctx.atomic_path(dest) as tmp,
        open(tmp, "wb") as fh,
        ctx.progress(f"encode {dest.stem}", unit="doc") as bar,
    ):
        for data, docs in encoder.map(line_batches(source, cfg.batch_docs)):
            fh.write(data)
            n_tokens += len(data) // itemsize
            n_docs += docs
            bar.advance(docs)
            bar.update(tokens=n_tokens)
    return n_tokens, n_docs


def build(cfg: EncodeConfig, ctx: StageContext) -> dict[str, Any]:
    require_artifact(cfg.data, ["train.jsonl.zst", "val.jsonl.zst"], hint=DATA_HINT)
    require_artifact(cfg.tokenizer, ["tokenizer.json"], hint=TOKENIZER_HINT)
    files = TokenizerFiles.load(cfg.tokenizer)
    if files.eos_id is None:
        raise InputError(
            f"{cfg.tokenizer} defines no eos_token in tokenizer_config.json; documents need an "
            "eos between them (retrain with lmforge tokenizer train, or add eos_token)"
        )
    dtype = token_dtype(files.vocab_size)
    counts: dict[str, int] = {}
    documents: dict[str, int] = {}
    tokenizer_json = Path(cfg.tokenizer, "tokenizer.json").resolve()
    encoder_name = choose_encoder(cfg, tokenizer_json)
    with ShardEncoder(files, dtype, encoder_name, resolve_workers(cfg.workers)) as encoder:
        for split in SPLITS:
            source = Path(cfg.data) / f"{split}.jsonl.zst"
            if source.exists():
                counts[split], documents[split] = encode_split(
                    encoder, source, ctx.out / f"{split}.bin", cfg, ctx
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
        "encoder": encoder_name,
    }
