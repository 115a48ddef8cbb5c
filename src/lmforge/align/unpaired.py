"""Unpaired feedback for KTO: completions labelled desirable or undesirable, one at a time.

A record is one of (per line of a .jsonl[.gz|.zst] file; every file under a directory is read):

- unpaired, TRL's KTO format: `{"prompt": P, "completion": str, "label": true|false}`, the
  completion a string or TRL's one-message list `[{"role": "assistant", "content": ...}]`
- any preference record align.prefs reads (pair or ranked list): each pair is unpaired, its chosen
  reply desirable and its rejected one undesirable (as TRL's unpair_preference_dataset), and the
  two remember their pair so held-out pairwise accuracy can be measured as DPO's

P is a string or chat messages, as align.prefs. The serving feedback store is a source: its
SQLite file (exported first with the rating thresholds given) or a feedback export directory,
whose kto.jsonl is read. A record that fits no shape is an InputError naming the file and line.
Every example becomes `{"prompt": [messages], "completion": str, "desirable": bool}` plus
`"pair": (record, index)` when it came from a pair, and a tool conversation's OpenAI form under
`tool_conversation` (align.prefs.prompt_fields: a record with `tools`, tool calls or results).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.align.prefs import pairs_of, prompt_fields, record_files, response_text
from lmforge.common.io import read_user_jsonl
from lmforge.errors import InputError

Example = dict[str, Any]
KTO_FILE = "kto.jsonl"  # what a feedback export writes for KTO


def examples_of(record: dict[str, Any], where: int) -> list[Example]:
    """The examples one record holds (where: its position, naming its pairs); ValueError says
    what is wrong with it."""
    if "label" not in record and "completion" not in record:
        return [
            {**_prompt_of(p), "completion": p[side], "desirable": side == "chosen",
             "pair": (where, i)}
            for i, p in enumerate(pairs_of(record))
            for side in ("chosen", "rejected")
        ]  # fmt: skip
    if "prompt" not in record or "completion" not in record or "label" not in record:
        raise ValueError(
            f"record with keys {sorted(record)} is not unpaired feedback; expected "
            '{"prompt", "completion", "label": true|false} or a preference pair'
        )
    label = record["label"]
    if not isinstance(label, bool):
        raise ValueError(f"label must be true (desirable) or false (undesirable), got {label!r}")
    completion = response_text(record["completion"], "completion")
    return [{**prompt_fields(record), "completion": completion, "desirable": label}]


def _prompt_of(pair: dict[str, Any]) -> dict[str, Any]:
    """A pair's prompt fields (its tool conversation too, when it has one)."""
    return {k: pair[k] for k in ("prompt", "tool_conversation") if k in pair}


def load_unpaired_groups(path: Path, options: dict[str, Any] | None = None) -> list[list[Example]]:
    """Each record's examples, record by record (a split then keeps a pair's two halves
    together); options are the feedback export's rating thresholds when path is the store."""
    groups: list[list[Example]] = []
    with record_files(path, KTO_FILE, options) as files:
        for file in files:
            for line, record in read_user_jsonl(file):
                try:
                    groups.append(examples_of(record, len(groups)))
                except ValueError as err:
                    raise InputError(f"{file} line {line}: {err}") from None
    if not any(groups):
        raise InputError(
            f"{path} holds no examples; pass prompt/completion/label or prompt/chosen/rejected "
            "records"
        )
    return groups


def label_counts(examples: list[Example]) -> dict[str, int]:
    """How many examples are desirable and undesirable."""
    desirable = sum(e["desirable"] for e in examples)
    return {"desirable": desirable, "undesirable": len(examples) - desirable}
