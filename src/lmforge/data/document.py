"""The unit of the data pipeline: a Document, and the Reject a reader emits for bad input.

Readers yield Documents for good records and Rejects for records they could not read (undecodable
bytes, broken JSON, a missing text field, an empty file, HTML without content, an oversized
line). A Reject carries the file and line/record so a person can find it; the pipeline counts
and samples every one instead of crashing or dropping it silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Document:
    """One text with where it came from.

    Attributes:
        id: stable identifier within its source (e.g. "file.jsonl:12" or "stdlib:json.dumps").
        text: the content.
        source: which configured source produced it (its path or name).
        meta: anything else (module, qualified name, language, url, ...); kept in the output.
    """

    id: str
    text: str
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        """The JSON object written to the output shards: text first, then metadata."""
        return {"text": self.text, "id": self.id, "source": self.source, **self.meta}

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Document:
        """Inverse of to_record (used when re-reading spilled documents)."""
        rec = dict(rec)
        text, doc_id, source = rec.pop("text"), rec.pop("id"), rec.pop("source", "")
        return cls(doc_id, text, source, rec)


@dataclass
class Reject:
    """A record a reader could not turn into a Document, with where and why."""

    where: str  # "path:line" or "path#record"
    reason: str  # short machine-friendly reason, counted in stats.json
    detail: str = ""  # human explanation or a snippet

    def to_record(self) -> dict[str, Any]:
        return {"where": self.where, "reason": self.reason, "detail": self.detail[:300]}
