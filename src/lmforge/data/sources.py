"""Source resolution: a path, folder, glob, HF dataset or `stdlib-docs` -> a stream of items.

Folders and globs expand to their files in sorted order, and each file goes to the reader for
its extension, so the same inputs always give the same document order. A path that does not
exist (and is not a known name) is one InputError line.
"""

from __future__ import annotations

import glob as globlib
from collections.abc import Callable, Iterator
from pathlib import Path

import zstandard

from lmforge.data import readers, web
from lmforge.data.config import SourceSpec
from lmforge.data.document import Reject
from lmforge.data.readers import Item
from lmforge.data.stdlib_docs import NAME as STDLIB
from lmforge.data.stdlib_docs import read_stdlib_docs
from lmforge.errors import InputError

EXTENSIONS: dict[str, str] = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".html": "html",
    ".htm": "html",
    ".warc": "warc",
    ".arc": "warc",
    ".txt": "text",
    ".md": "text",
    ".rst": "text",
    ".text": "text",
}
COMPRESSED = (".gz", ".zst")


def file_kind(path: Path) -> str | None:
    """The reader kind for a file by extension (.gz/.zst look through), or None if unknown."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    return EXTENSIONS.get(suffixes[-1]) if suffixes else "text"


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _is_hf_dir(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def source_files(spec: SourceSpec) -> list[Path]:
    """The files a file-based source covers (sorted); [] for stdlib-docs and HF datasets."""
    if spec.path == STDLIB or spec.kind in ("stdlib-docs", "hf"):
        return []
    if _is_glob(spec.path):
        return [
            Path(p) for p in sorted(globlib.glob(spec.path, recursive=True)) if Path(p).is_file()
        ]
    path = Path(spec.path)
    if path.is_dir():
        if _is_hf_dir(path):
            return []
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [path] if path.is_file() else []


def check_source(spec: SourceSpec) -> None:
    """Raises InputError (one line) for a source that cannot be read at all."""
    if spec.path == STDLIB or spec.kind in ("stdlib-docs", "hf"):
        return
    path = Path(spec.path)
    if _is_glob(spec.path):
        if not source_files(spec):
            raise InputError(f"source {spec.path}: the glob matches no files")
        return
    if not path.exists():
        raise InputError(
            f"source {spec.path}: no such file or folder, and not a known source "
            f"(use a path, a glob, '{STDLIB}', or kind: hf for a Hugging Face dataset)"
        )


def _reader(kind: str, max_bytes: int, text_field: str) -> Callable[[Path, str], Iterator[Item]]:
    table: dict[str, Callable[[Path, str], Iterator[Item]]] = {
        "text": lambda p, s: readers.read_text_file(p, s, max_bytes),
        "jsonl": lambda p, s: readers.read_jsonl(p, s, text_field, max_bytes),
        "parquet": lambda p, s: readers.read_parquet(p, s, text_field),
        "html": lambda p, s: web.read_html_file(p, s, max_bytes),
        "warc": lambda p, s: web.read_warc(p, s, max_bytes),
    }
    return table[kind]


def iter_source(
    spec: SourceSpec,
    default_text_field: str = "text",
    max_bytes: int = readers.DEFAULT_MAX_RECORD_BYTES,
) -> Iterator[Item]:
    """Every item of one source, in a deterministic order."""
    check_source(spec)
    text_field = spec.text_field or default_text_field
    name = spec.path
    if spec.path == STDLIB or spec.kind == "stdlib-docs":
        yield from read_stdlib_docs(name)
        return
    if spec.kind == "hf" or (Path(spec.path).is_dir() and _is_hf_dir(Path(spec.path))):
        yield from readers.read_hf(spec.path, name, text_field, spec.split)
        return
    for path in source_files(spec):
        kind = spec.kind if spec.kind != "auto" else file_kind(path)
        if kind is None:
            yield Reject(
                str(path),
                "unknown_format",
                f"no reader for '{path.suffix}' (set kind: text|jsonl|parquet|html|warc)",
            )
            continue
        try:
            yield from _reader(kind, max_bytes, text_field)(path, name)
        except (OSError, EOFError, zstandard.ZstdError) as exc:  # truncated or corrupt archives
            yield Reject(str(path), "unreadable", f"{type(exc).__name__}: {exc}"[:200])
