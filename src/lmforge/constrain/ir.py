"""The grammar's intermediate form: the few node kinds every constraint compiles to.

JSON schemas, regexes and choices are all turned into these nodes (plain frozen dataclasses), and
one compiler (constrain/automaton.py) turns them into a character automaton. `Ref` names a rule
of the grammar, so recursive languages (any JSON value, nested $defs) stay finite.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field


@dataclass(frozen=True)
class CharSet:
    """A set of characters as sorted inclusive code point ranges, possibly negated."""

    ranges: tuple[tuple[int, int], ...]
    negate: bool = False
    # the ranges merged, as starts and ends for a binary search (not compared or hashed)
    _starts: list[int] = field(default_factory=list, compare=False, repr=False)
    _ends: list[int] = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self) -> None:
        for lo, hi in sorted(self.ranges):
            if self._ends and lo <= self._ends[-1] + 1:
                self._ends[-1] = max(self._ends[-1], hi)
            else:
                self._starts.append(lo)
                self._ends.append(hi)

    @classmethod
    def of(cls, chars: str, negate: bool = False) -> CharSet:
        return cls(tuple((ord(c), ord(c)) for c in sorted(set(chars))), negate)

    def contains(self, ch: str) -> bool:
        code = ord(ch)
        i = bisect_right(self._starts, code) - 1
        return (i >= 0 and code <= self._ends[i]) != self.negate

    def meets(self, lo: int, hi: int) -> bool:
        """Whether some code point in [lo, hi] is in the set."""
        if not self.negate:
            return any(a <= hi and lo <= b for a, b in self.ranges)
        start = lo  # negated: [lo, hi] must not be wholly covered by the excluded ranges
        for a, b in sorted(self.ranges):
            if a > start:
                break
            start = max(start, b + 1)
        return start <= hi


@dataclass(frozen=True)
class Chars:
    """One character from a set."""

    set: CharSet


@dataclass(frozen=True)
class Lit:
    """A literal string."""

    text: str


@dataclass(frozen=True)
class Seq:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Alt:
    options: tuple[Node, ...]


@dataclass(frozen=True)
class Repeat:
    """`item` between `min` and `max` times (max None: unbounded)."""

    item: Node
    min: int
    max: int | None


@dataclass(frozen=True)
class Ref:
    """The grammar's rule `name` (the grammar's rules map names to nodes)."""

    name: str


@dataclass(frozen=True)
class Members:
    """A JSON object's members in a fixed order, joined by `sep`; each (node, required). Optional
    members may be left out, and the separators follow whichever members are written; at least
    one is written (an empty object is the caller's other option: its whitespace differs)."""

    members: tuple[tuple[Node, bool], ...]
    sep: Node


Node = Chars | Lit | Seq | Alt | Repeat | Ref | Members


def optional(node: Node) -> Repeat:
    return Repeat(node, 0, 1)


def seq(*items: Node | str) -> Seq:
    """A sequence; plain strings are literals."""
    return Seq(tuple(Lit(i) if isinstance(i, str) else i for i in items))
