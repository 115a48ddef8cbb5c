"""File helpers every stage shares: atomic writes and streaming JSONL (plain, .gz, .zst).

An artifact is written to a temporary name beside its destination and renamed into place only
when complete, so a process killed mid-write never leaves a file that looks finished.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yields a temporary path beside `path`; on success it is renamed onto `path`.

    Works for files and for directories (the caller creates the directory at the yielded path).
    On an exception the temporary is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temp name keeps the real suffix so codecs chosen by extension (.zst, .gz) still apply.
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Writes bytes so that readers see either the old file or the complete new one."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_text(path: Path | str, text: str) -> None:
    """Writes UTF-8 text atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj: Any, indent: int | None = 2) -> None:
    """Writes JSON atomically (sorted keys are not forced: readers get the stage's own order)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def open_text(path: Path | str, mode: str = "rt") -> io.TextIOBase:
    """Opens plain, .gz or .zst text for streaming, by extension."""
    path = Path(path)
    binary_mode = mode.replace("t", "") + ("b" if "b" not in mode else "")
    if path.suffix == ".zst":
        import zstandard

        if "r" in mode:
            raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))
        else:
            raw = zstandard.ZstdCompressor(level=3).stream_writer(open(path, binary_mode))
        return io.TextIOWrapper(raw, encoding="utf-8", newline="\n")
    if path.suffix == ".gz":
        return gzip.open(path, mode, encoding="utf-8")  # type: ignore[return-value]
    return open(path, mode, encoding="utf-8")  # type: ignore[return-value]


def read_jsonl(path: Path | str) -> Iterator[dict[str, Any]]:
    """Streams JSON objects from a .jsonl[.gz|.zst] file (well-formed files: our own artifacts)."""
    with open_text(path) as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def read_user_jsonl(path: Path | str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) from a .jsonl[.gz|.zst] a person wrote: a bad line is an InputError
    naming the file and line, and blank lines are skipped."""
    from lmforge.errors import InputError

    with open_text(path) as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path} line {line_no}: not valid JSON ({err.msg})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path} line {line_no}: expected a JSON object per line")
            yield line_no, obj


def read_prompts(path: Path | str) -> list[str]:
    """Prompts from a file: one per non-empty line, or a "prompt" field per line of a .jsonl.

    `lmforge generate` and `lmforge serve bench` read the same prompt files."""
    from lmforge.errors import InputError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: prompts file not found")
    if path.suffix != ".jsonl":
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = []
    for number, record in read_user_jsonl(path):
        if not isinstance(record.get("prompt"), str):
            raise InputError(f'{path} line {number}: expected an object with a "prompt" string')
        prompts.append(record["prompt"])
    return prompts


def write_jsonl(path: Path | str, rows: Iterable[dict[str, Any]]) -> int:
    """Writes rows atomically to .jsonl[.gz|.zst]; returns how many were written."""
    count = 0
    with atomic_path(path) as tmp, open_text(tmp, "wt") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count
