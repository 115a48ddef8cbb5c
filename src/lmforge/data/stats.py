"""`lmforge data stats DIR`: the funnel of a data stage as a rich table.

Reads stats.json (written by the stage) and shows, per step, documents and characters in and
out and the most frequent drop reasons, then the split sizes and PII counts. With --bias, a
second table: each term group's two sides per split (per 1k words, ratio, labels).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from lmforge.data.bias_stats import labels_text
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


def _human(n: int) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def funnel_table(stats: dict[str, Any], top_reasons: int = 3) -> Table:
    """One row per step (docs in/out, chars out), its top drop reasons as dim rows beneath it."""
    table = Table(title=f"data funnel (python {stats.get('python', '?')})", box=box.SIMPLE_HEAD)
    table.add_column("step / drop reason", no_wrap=True, overflow="ellipsis", max_width=26)
    # chars in of a step = chars out of the one before, so only chars out is shown (stats.json has both)
    for col in ("docs in", "docs out", "kept", "chars out"):
        table.add_column(col, justify="right", no_wrap=True, min_width=max(len(col), 6))
    for step, row in stats["steps"].items():
        table.add_row(
            f"[bold]{step}[/bold]",
            f"{row['docs_in']:,}",
            f"{row['docs_out']:,}",
            _pct(row["docs_out"], row["docs_in"]),
            _human(row["chars_out"]),
        )
        reasons = list(row["dropped"].items())
        for reason, n in reasons[:top_reasons]:
            table.add_row(f"[dim]  - {reason}[/dim]", "", f"[dim]-{n:,}[/dim]", "", "")
        if len(reasons) > top_reasons:
            rest = sum(n for _, n in reasons[top_reasons:])
            table.add_row(
                f"[dim]  - {len(reasons) - top_reasons} more reasons[/dim]",
                "",
                f"[dim]-{rest:,}[/dim]",
                "",
                "",
                "",
            )
    splits = "  ".join(f"{k} {v:,}" for k, v in stats.get("splits", {}).items())
    pii = "  ".join(f"{k} {v:,}" for k, v in stats.get("pii", {}).items()) or "none"
    table.caption = (
        f"documents in {stats['documents_in']:,} -> out {stats['documents_out']:,}  |  {splits}  |  "
        f"rejects {stats['rejects']:,}  |  PII replaced: {pii}"
    )
    return table


def bias_table(report: dict[str, Any]) -> Table:
    """One row per split and group: each side's count and rate, their ratio, the top label."""
    table = Table(title="demographic terms per split", box=box.SIMPLE_HEAD)
    for col in ("split", "group", "side 0", "per 1k", "side 1", "per 1k", "ratio 0/1", "labels"):
        table.add_column(col, justify="left" if col in ("split", "group", "labels") else "right")
    for split, rep in report.items():
        for name, g in rep["groups"].items():
            (s0, a), (s1, b) = g["sides"].items()
            ratio = "-" if g["ratio"] is None else f"{g['ratio']:.3g}"
            table.add_row(split, name, f"{s0} {a['count']:,}", f"{a['per_1k_words']:.3g}",
                          f"{s1} {b['count']:,}", f"{b['per_1k_words']:.3g}", ratio,
                          labels_text(g, per_side=3))  # fmt: skip
    return table
