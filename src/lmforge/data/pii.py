"""PII anonymization: emails, phone numbers, IP addresses, card numbers and (opt-in) person names
become typed placeholders.

Card-like digit runs are replaced only when they pass the Luhn check, so ordinary long numbers
survive. Names come from data/names.py (lexicons + cue phrases), compiled on first use. The step
never drops a document; it counts replacements per type (stats.json "pii").
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from lmforge.data.document import Document
from lmforge.data.names import name_patterns

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d)")
IPV6 = re.compile(r"\b(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}\b")
CARD = re.compile(r"\b\d(?:[ -]?\d){12,18}\b")
PHONE = re.compile(
    r"(?<![\w.])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}\b(?![ .-]?\d)"
)
PLACEHOLDERS = {
    "email": "<EMAIL>",
    "ip": "<IP_ADDRESS>",
    "card": "<CARD_NUMBER>",
    "phone": "<PHONE>",
    "name": "<NAME>",
}


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum used by payment card numbers."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _valid_ip(text: str) -> bool:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    return not (ip.is_loopback or ip.is_unspecified)  # 127.0.0.1 / 0.0.0.0 in docs are not PII


def _card_ok(text: str) -> bool:
    return luhn_valid(re.sub(r"\D", "", text))


def _phone_ok(text: str) -> bool:
    return 7 <= sum(c.isdigit() for c in text) <= 15


Matchers = tuple[tuple[re.Pattern, Callable[[str], bool] | None], ...]


class _Detectors(Mapping[str, Matchers]):
    """kind -> its (pattern, check of the matched text or None) pairs, built when asked for: the
    name patterns take seconds to compile (once per process) and most runs never ask for them."""

    def __init__(self, builders: dict[str, Callable[[], Matchers]]) -> None:
        self._builders = builders

    def __getitem__(self, kind: str) -> Matchers:
        return self._builders[kind]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._builders)

    def __len__(self) -> int:
        return len(self._builders)


# In the order they must apply: cards and IPs before phones, whose pattern would match parts of
# them; names last, after the emails that contain them. The serving safety policy reuses these
# (serve/safety.py's `pii:` rules).
PII_PATTERNS: Mapping[str, Matchers] = _Detectors(
    {
        "email": lambda: ((EMAIL, None),),
        "card": lambda: ((CARD, _card_ok),),
        "ip": lambda: ((IPV4, _valid_ip), (IPV6, _valid_ip)),
        "phone": lambda: ((PHONE, _phone_ok),),
        "name": name_patterns,
    }
)


@dataclass
class PiiStep:
    """Replaces PII with placeholders; `counts` accumulates replacements per type."""

    email: bool = True
    phone: bool = True
    ip: bool = True
    card: bool = True
    names: bool = False  # kind "name" (`name` is the step's own name)
    name: str = "pii"
    counts: Counter = field(default_factory=Counter)

    def __call__(self, doc: Document) -> str | None:
        doc.text = self.anonymize(doc.text)
        return None

    def anonymize(self, text: str) -> str:
        for kind in PII_PATTERNS:
            if getattr(self, "names" if kind == "name" else kind):
                for pattern, check in PII_PATTERNS[kind]:
                    text = self._sub(pattern, kind, text, check)
        return text

    def _sub(self, pattern: re.Pattern, kind: str, text: str, check=None) -> str:
        def repl(match: re.Match) -> str:
            if check is not None and not check(match.group(0)):
                return match.group(0)
            self.counts[kind] += 1
            return PLACEHOLDERS[kind]

        return pattern.sub(repl, text)
