"""Data-side bias report: how often each side of each term group occurs in a split.

Counts are per 1,000 words so splits of different sizes compare, the ratio between the two
sides says how skewed a split is, and, for labeled rows, counts per label show a term that always
travels with one label (the shortcut a classifier would learn). A few example snippets per
side make the numbers checkable by eye.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from lmforge.data.terms import TermGroup, load_groups

SNIPPET = 120  # characters around a term in the examples
_WORD = re.compile(r"\w+")


class TermCounter:
    """Accumulates term counts per group and side over the rows of one split."""

    def __init__(self, groups: list[TermGroup], examples: int = 3) -> None:
        self.groups, self.examples = groups, examples
        self.words = 0
        self.counts = {g.name: [Counter(), Counter()] for g in groups}  # side -> term -> n
        self.docs = {g.name: [0, 0] for g in groups}  # rows mentioning each side
        self.by_label = {g.name: [Counter(), Counter()] for g in groups}  # side -> label -> rows
        self.samples: dict[str, list[list[str]]] = {g.name: [[], []] for g in groups}

    def add(self, text: str, label: Any = None, copies: int = 1) -> None:
        self.words += copies * len(_WORD.findall(text))
        for g in self.groups:
            found = [(m.group(0).lower(), m.start()) for m in g.pattern.finditer(text)]
            sides_seen = set()
            for term, start in found:
                side = g.side_of[term]
                self.counts[g.name][side][term] += copies
                if side not in sides_seen:
                    sides_seen.add(side)
                    self.docs[g.name][side] += copies
                    if label is not None:
                        self.by_label[g.name][side][str(label)] += copies
                    if len(self.samples[g.name][side]) < self.examples:
                        lo = max(0, start - SNIPPET // 2)
                        self.samples[g.name][side].append(text[lo : lo + SNIPPET])

    def to_dict(self) -> dict[str, Any]:
        """{"words", "groups": {name: {"sides": {side: {...}}, "ratio", ...}}} (JSON-able)."""
        out: dict[str, Any] = {"words": self.words, "groups": {}}
        for g in self.groups:
            sides = {}
            for s, side in enumerate(g.sides):
                n = sum(self.counts[g.name][s].values())
                sides[side] = {
                    "count": n,
                    "per_1k_words": round(1000 * n / self.words, 4) if self.words else 0.0,
                    "rows": self.docs[g.name][s],
                    "top_terms": dict(self.counts[g.name][s].most_common(5)),
                    "by_label": dict(sorted(self.by_label[g.name][s].items())),
                    "examples": self.samples[g.name][s],
                }
            a, b = (sides[x]["count"] for x in g.sides)
            out["groups"][g.name] = {
                "sides": sides,
                # side 0 over side 1; None when side 1 never occurs (inf is not JSON)
                "ratio": round(a / b, 4) if b else None,
            }
        return out


def labels_text(group: dict[str, Any], per_side: int | None = None) -> str:
    """A group report's rows by label, side by side: "female: care 12; male: build 9, care 1"
    (at most per_side labels of each side, in name order; sides without labels left out)."""
    return "; ".join(
        f"{side}: " + ", ".join(f"{k} {v}" for k, v in list(d["by_label"].items())[:per_side])
        for side, d in group["sides"].items()
        if d.get("by_label")
    )


def split_term_report(
    rows_by_split: dict[str, Any],
    groups: list[TermGroup],
    text_field: str = "text",
    label_field: str = "label",
) -> dict[str, Any]:
    """A TermCounter report per split from {split: iterable of records}."""
    report = {}
    for split, rows in rows_by_split.items():
        counter = TermCounter(groups)
        for row in rows:
            counter.add(str(row.get(text_field, "")), row.get(label_field))
        report[split] = counter.to_dict()
    return report


def stage_term_report(
    out_dir: Path, terms: Path | None = None, groups: list[str] | None = None
) -> dict[str, Any]:
    """A data stage's term report: stats.json's (built with bias: on), else counted from its
    split files now (also when another terms file or group list is asked for)."""
    from lmforge.common.io import read_jsonl
    from lmforge.data.split import SPLITS
    from lmforge.errors import InputError

    out_dir = Path(out_dir)
    stats_path = out_dir / "stats.json"
    if terms is None and not groups and stats_path.is_file():
        stored = json.loads(stats_path.read_text(encoding="utf-8")).get("bias")
        if stored:
            return stored
    files = {s: out_dir / f"{s}.jsonl.zst" for s in SPLITS if (out_dir / f"{s}.jsonl.zst").exists()}
    if not files:
        raise InputError(
            f"{out_dir} has no split files; build it with: lmforge data prepare --source PATH "
            f"--out {out_dir} --set bias.enabled=true"
        )
    return split_term_report(
        {s: read_jsonl(f) for s, f in files.items()}, load_groups(terms, groups or None)
    )
