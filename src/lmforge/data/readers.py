"""Streaming readers for file formats: plain text, JSONL (.gz/.zst), Parquet, Hugging Face datasets.

Every reader yields Documents for good records and Rejects (file + line/record + reason) for bad
ones, so bad input is counted, never a crash and never a silent drop. Lines are read with a byte
limit: a 50 MB single line becomes one Reject while memory stays flat.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from lmforge.data.document import Document, Reject
from lmforge.errors import InputError

Item = Document | Reject

# A single record (line, file or field) larger than this is rejected rather than held in memory.
DEFAULT_MAX_RECORD_BYTES = 8 * 1024 * 1024
_SKIP_CHUNK = 1 << 20


class _ZstdReader(io.RawIOBase):
    """Streams a .zst file frame by frame, and raises EOFError when the last frame is cut short.

    zstandard's stream_reader just stops at a truncated frame; a silent end would drop records.
    """

    def __init__(self, path: Path) -> None:
        import zstandard

        self._fh, self._zstd = open(path, "rb"), zstandard
        self._dobj, self._started = zstandard.ZstdDecompressor().decompressobj(), False
        self._buf, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, out: Any) -> int:
        while self._pos >= len(self._buf):
            self._buf, self._pos = b"", 0
            chunk = self._fh.read(1 << 16)
            if not chunk:
                if self._started and not self._dobj.eof:
                    raise EOFError("zstd stream ends inside a frame (truncated file)")
                return 0
            while chunk:
                self._started = True
                self._buf += self._dobj.decompress(chunk)
                chunk = self._dobj.unused_data if self._dobj.eof else b""
                if self._dobj.eof:  # next frame, if any
                    self._dobj, self._started = (
                        self._zstd.ZstdDecompressor().decompressobj(),
                        bool(chunk),
                    )
        n = min(len(out), len(self._buf) - self._pos)
        out[:n] = self._buf[self._pos : self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


def open_binary(path: Path) -> BinaryIO:
    """Opens a plain, .gz or .zst file for binary streaming."""
    name = path.name.lower()
    if name.endswith(".zst"):
        return io.BufferedReader(_ZstdReader(path))  # type: ignore[return-value]
    if name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def iter_lines(fh: BinaryIO, max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """Yields (line number, bytes) and (line number, None) for lines longer than max_bytes.

    An overlong line is skipped chunk by chunk, so its size never lands in memory.
    """
    lineno = 0
    while True:
        line = fh.readline(max_bytes + 1)
        if not line:
            return
        lineno += 1
        if len(line) > max_bytes and not line.endswith(b"\n"):
            while True:
                rest = fh.readline(_SKIP_CHUNK)
                if not rest or rest.endswith(b"\n"):
                    break
            yield lineno, None
            continue
        yield lineno, line


def decode(data: bytes, where: str) -> str | Reject:
    """Strict UTF-8 decoding; bad bytes become a Reject naming the byte offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Reject(where, "undecodable", f"invalid UTF-8 at byte {exc.start}")


def read_text_file(
    path: Path, source: str, max_bytes: int = DEFAULT_MAX_RECORD_BYTES
) -> Iterator[Item]:
    """One file = one document."""
    where = str(path)
    with open_binary(path) as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        yield Reject(where, "too_large", f"file larger than {max_bytes} bytes")
        return
    text = decode(data, where)
    if isinstance(text, Reject):
        yield text
    elif not text.strip():
        yield Reject(where, "empty", "file has no text")
    else:
        yield Document(where, text, source, {"path": where})


def get_field(rec: dict[str, Any], dotted: str) -> Any:
    """rec["a"]["b"] for "a.b"; None when any part is missing."""
    node: Any = rec
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def record_to_item(rec: Any, where: str, source: str, text_field: str) -> Item:
    """Turns one JSON-like record into a Document, or a Reject saying what is wrong with it."""
    if not isinstance(rec, dict):
        return Reject(where, "not_object", f"expected a JSON object, got {type(rec).__name__}")
    text = get_field(rec, text_field)
    if text is None:
        keys = ", ".join(list(rec)[:8])
        return Reject(where, "missing_field", f"no '{text_field}' field (keys: {keys})")
    if not isinstance(text, str):
        return Reject(where, "bad_field", f"'{text_field}' is {type(text).__name__}, not text")
    if not text.strip():
        return Reject(where, "empty", f"'{text_field}' is empty")
    meta = {k: v for k, v in rec.items() if k != text_field and k not in ("id", "source")}
    return Document(str(rec.get("id", where)), text, source, meta)


def read_jsonl(
    path: Path, source: str, text_field: str = "text", max_bytes: int = DEFAULT_MAX_RECORD_BYTES
) -> Iterator[Item]:
    """One line = one JSON object = one document (plain, .gz or .zst)."""
    empty = True
    with open_binary(path) as fh:
        for lineno, raw in iter_lines(fh, max_bytes):
            where = f"{path}:{lineno}"
            if raw is None:
                empty = False
                yield Reject(where, "too_large", f"line longer than {max_bytes} bytes")
                continue
            if not raw.strip():
                continue
            empty = False
            line = decode(raw, where)
            if isinstance(line, Reject):
                yield line
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                yield Reject(where, "bad_json", f"{exc.msg} at column {exc.colno}")
                continue
            yield record_to_item(rec, where, source, text_field)
    if empty:
        yield Reject(str(path), "empty", "file has no records")


def read_parquet(path: Path, source: str, text_field: str = "text") -> Iterator[Item]:
    """Parquet rows in batches (pyarrow), one row = one document."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow is in the data extra
        raise InputError("reading Parquet needs pyarrow: pip install 'lmforge[data]'") from exc
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        yield Reject(str(path), "bad_parquet", str(exc).splitlines()[0][:200])
        return
    if pf.metadata.num_rows == 0:
        yield Reject(str(path), "empty", "file has no rows")
        return
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            yield record_to_item(rec, f"{path}#{row}", source, text_field)
            row += 1


def read_hf(
    name_or_path: str, source: str, text_field: str = "text", split: str = "train"
) -> Iterator[Item]:
    """A Hugging Face dataset: a save_to_disk directory, a local data directory, or a hub name.

    save_to_disk directories are memory-mapped Arrow (iterated, not loaded); everything else goes
    through load_dataset(streaming=True).
    """
    try:
        import datasets
    except ImportError as exc:
        raise InputError(
            f"source {name_or_path}: Hugging Face datasets need: pip install 'lmforge[hf]'"
        ) from exc
    path = Path(name_or_path)
    try:
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            ds: Any = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split] if split in ds else ds[next(iter(ds))]
        else:
            ds = datasets.load_dataset(name_or_path, split=split, streaming=True)
    except Exception as exc:  # datasets raises many types (FileNotFound, ConnectionError, ...)
        msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise InputError(
            f"source {name_or_path}: cannot open as a Hugging Face dataset ({msg})"
        ) from None
    for i, rec in enumerate(ds):
        yield record_to_item(rec, f"{name_or_path}#{i}", source, text_field)
