"""Demographic term groups for bias checks: the word list, whole-word matching and swapping.

A group (gender, religion, ...) has two sides and pairs of terms, one per side:
`{"gender": {"sides": ["male", "female"], "pairs": [["he", "she"], ["man", "woman"], ...]}}`.
The built-in list is resources/bias_terms.json; a user file (JSON or YAML, same shape) replaces
it. The data side counts each side's terms; the eval side rewrites a text to each side and
compares the model's scores of the two versions (lmforge.evals.bias).

Matching is whole-word and case-insensitive; a rewritten word keeps the case of the one it
replaces ("He" -> "She", "HIS" -> "HER"). When a term sits in several pairs ("her" is both
"him" and "his"), rewriting to the other side uses the first pair that lists it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.common.json_cache import read_json_object
from lmforge.config import load_yaml
from lmforge.errors import ConfigError, InputError

BUILTIN = Path(__file__).parent / "resources" / "bias_terms.json"
TERMS_FIX = "mend it (group -> sides, pairs)"  # what to do about a malformed term file


@dataclass(frozen=True)
class TermGroup:
    """One group: its two side names and (side-0 term, side-1 term) pairs, lowercase."""

    name: str
    sides: tuple[str, str]
    pairs: tuple[tuple[str, str], ...]
    pattern: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        words = sorted({w for pair in self.pairs for w in pair}, key=lambda w: (-len(w), w))
        regex = r"\b(" + "|".join(re.escape(w) for w in words) + r")\b"
        object.__setattr__(self, "pattern", re.compile(regex, re.IGNORECASE))

    @functools.cached_property
    def side_of(self) -> dict[str, int]:
        """term -> 0 or 1 (a term listed on both sides counts for the first)."""
        out: dict[str, int] = {}
        for pair in self.pairs:
            for side, word in enumerate(pair):
                out.setdefault(word, side)
        return out

    @functools.cached_property
    def _to_side(self) -> tuple[dict[str, str], dict[str, str]]:
        maps: tuple[dict[str, str], dict[str, str]] = ({}, {})
        for a, b in self.pairs:
            maps[0].setdefault(b, a)
            maps[1].setdefault(a, b)
        return maps

    def rewrite(self, text: str, side: int) -> tuple[str, int]:
        """text with every term of this group turned into its `side` term; (text, terms seen)."""
        table, seen = self._to_side[side], 0

        def repl(m: re.Match) -> str:
            nonlocal seen
            seen += 1
            word = m.group(0)
            new = table.get(word.lower(), word.lower())
            return match_case(new, word)

        return self.pattern.sub(repl, text), seen

    def find(self, text: str) -> list[str]:
        """The group's terms in text, lowercase, in order."""
        return [m.group(0).lower() for m in self.pattern.finditer(text)]


def match_case(new: str, old: str) -> str:
    """new spelled with old's case: UPPER, Capitalized or lower."""
    if old.isupper() and len(old) > 1:
        return new.upper()
    if old[:1].isupper():
        return new[:1].upper() + new[1:]
    return new


def load_groups(path: Path | None = None, names: list[str] | None = None) -> list[TermGroup]:
    """The groups of a term file (default: the built-in list), optionally only `names`."""
    source = Path(path) if path is not None else BUILTIN
    if not source.is_file():
        raise InputError(
            f"bias terms file {source} not found (JSON or YAML: group -> sides, pairs)"
        )
    if source.suffix in (".yaml", ".yml"):
        try:
            data = load_yaml(source)  # names the file and the line where it breaks
        except ConfigError as err:
            raise InputError(f"{err}; {TERMS_FIX}") from None
    else:
        data = read_json_object(source, TERMS_FIX)
    groups = []
    for name, body in data.items():
        body = body if isinstance(body, dict) else {}
        sides, pairs = body.get("sides"), body.get("pairs")
        if not (isinstance(sides, list) and len(sides) == 2 and isinstance(pairs, list) and pairs):
            raise InputError(
                f"{source}: group '{name}' needs 'sides' (two names) and 'pairs' ([[a, b], ...])"
            )
        bad = [p for p in pairs if not (isinstance(p, list) and len(p) == 2)]
        if bad:
            raise InputError(f"{source}: group '{name}' has pairs that are not [a, b]: {bad[:3]}")
        groups.append(
            TermGroup(name, (str(sides[0]), str(sides[1])),
                      tuple((str(a).lower(), str(b).lower()) for a, b in pairs))
        )  # fmt: skip
    if not groups:
        raise InputError(f"{source} holds no term groups; {TERMS_FIX}, as the built-in list does")
    if names:
        unknown = sorted(set(names) - {g.name for g in groups})
        if unknown:
            raise InputError(
                f"bias groups {unknown} are not in {source} (it has {[g.name for g in groups]})"
            )
        groups = [g for g in groups if g.name in names]
    return groups
