"""`lmforge data stats DIR`: the funnel of a data stage as a rich table.

Reads stats.json (written by the stage) and shows, per step, documents and characters in and
out and the most frequent drop reasons, then the split sizes and PII counts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from lmforge.errors import InputError


def load_stats(out_dir: Path) -> dict[str, Any]:
    """stats.json of a data stage directory, with a one-line error when it is missing."""
    path = Path(out_dir) / "stats.json"
    if not path.is_file():
        raise InputError(
            f"{out_dir} has no stats.json; build it with: lmforge data prepare --source PATH --out {out_dir}"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def funnel_table(stats: dict[str, Any], top_reasons: int = 3) -> Table:
    """One row per step: docs in/out, kept %, chars in/out, top drop reasons."""
    table = Table(title=f"data funnel (python {stats.get('python', '?')})")
    for col in ("step", "docs in", "docs out", "kept", "chars in", "chars out", "top reasons"):
        if col == "top reasons":
            table.add_column(col, overflow="fold", min_width=20)
        else:
            left = col == "step"
            table.add_column(
                col,
                justify="left" if left else "right",
                no_wrap=True,
                min_width=17 if left else None,
            )
    for step, row in stats["steps"].items():
        reasons = ", ".join(f"{r} {n}" for r, n in list(row["dropped"].items())[:top_reasons])
        table.add_row(
            step,
            f"{row['docs_in']:,}",
            f"{row['docs_out']:,}",
            _pct(row["docs_out"], row["docs_in"]),
            f"{row['chars_in']:,}",
            f"{row['chars_out']:,}",
            reasons,
        )
    splits = "  ".join(f"{k} {v:,}" for k, v in stats.get("splits", {}).items())
    pii = "  ".join(f"{k} {v:,}" for k, v in stats.get("pii", {}).items()) or "none"
    table.caption = f"documents in {stats['documents_in']:,} -> out {stats['documents_out']:,}  |  {splits}  |  rejects {stats['rejects']:,}  |  PII replaced: {pii}"
    return table
