"""Text cleaning: unicode repair, NFKC, control characters, leftover markup, whitespace.

A cleaning step never drops a document for being dirty; it repairs it, and drops only what is
empty after repair (reason "empty_after_clean").
"""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass

from lmforge.data.document import Document

# C0/C1 control characters except tab and newline; zero-width and BOM characters.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")
_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(?:\s[^<>]{0,200})?/?>")
_ENTITY = re.compile(r"&(?:#\d{1,7}|#x[0-9a-fA-F]{1,6}|[a-zA-Z]{2,10});")
_SPACES = re.compile(r"[ \t\f\v\u00a0]+")
_BLANKS = re.compile(r"\n{3,}")


@dataclass
class CleanStep:
    """Repairs text in place. Each switch maps to a `clean.*` config key."""

    ftfy: bool = True
    nfkc: bool = True
    control_chars: bool = True
    strip_tags: bool = True
    whitespace: bool = True
    lowercase: bool = False
    name: str = "clean"

    def __call__(self, doc: Document) -> str | None:
        doc.text = self.clean(doc.text)
        return None if doc.text else "empty_after_clean"

    def clean(self, text: str) -> str:
        """The repaired text (also used on eval sets, so decontamination sees the same form)."""
        if self.ftfy:
            import ftfy

            text = ftfy.fix_text(text, normalization="NFC")
        if self.nfkc:
            text = unicodedata.normalize("NFKC", text)
        if self.strip_tags:
            text = _TAG.sub("", text)
            if _ENTITY.search(text):
                text = html.unescape(text)
        if self.control_chars:
            text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
        if self.whitespace:
            lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
            text = _BLANKS.sub("\n\n", "\n".join(lines)).strip()
        if self.lowercase:
            text = text.lower()
        return text
