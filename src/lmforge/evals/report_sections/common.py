"""What every report section shares: tolerant readers of a stage's files and cell formatting.

A missing or malformed file reads as None or no rows, never an exception, because a report of a
half-finished run is still worth reading.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.common.io import read_jsonl

SAMPLE_CHARS = 300  # characters of each sample shown in tables


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def read_rows(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for row in read_jsonl(path):
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    return rows


def clip(text: Any, n: int = SAMPLE_CHARS) -> str:
    text = str(text)
    return text if len(text) <= n else text[:n] + "…"


def fmt_num(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def pick(row: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """The first of several accepted spellings of a field (documents_in / docs_in ...)."""
    for key in keys:
        if key in row:
            return row[key]
    return default


def scalars_table(data: dict[str, Any], header: tuple[str, str] = ("stat", "value")) -> list:
    rows: list[list[Any]] = [list(header)]
    for key, value in data.items():
        if isinstance(value, dict):
            rows += [
                [f"{key}.{k}", fmt_num(v)]
                for k, v in value.items()
                if not isinstance(v, (dict, list))
            ]
        elif not isinstance(value, list):
            rows.append([key, fmt_num(value)])
    return rows
