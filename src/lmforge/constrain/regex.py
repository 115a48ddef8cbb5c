"""A regex subset parsed into a grammar that the whole answer must match (re.fullmatch).

Supported: literals and escapes (\\n \\t \\. ...), classes ([a-z0-9_], [^...], \\d \\w \\s and
their negations, ASCII as under re.ASCII), `.` (any character but a newline), `?`, `*`, `+`,
`{m}`, `{m,}`, `{,n}`, `{m,n}` (a trailing lazy `?` changes nothing for a full match), `|`, groups
`(...)` and `(?:...)`, and `^`/`$` at the ends. Anything else (lookarounds, backreferences,
word boundaries, flags) is refused with a ConstraintError naming it and its position.
"""

from __future__ import annotations

from lmforge.constrain.automaton import ConstraintError, Grammar
from lmforge.constrain.ir import Alt, Chars, CharSet, Lit, Node, Repeat, Seq


def _span(first: str, last: str) -> tuple[int, int]:
    return ord(first), ord(last)


CLASSES = {  # \d \w \s as under re.ASCII; their capitals are the negations
    "d": (_span("0", "9"),),
    "w": (_span("0", "9"), _span("A", "Z"), _span("_", "_"), _span("a", "z")),
    "s": (_span("\t", "\r"), _span(" ", " ")),
}
ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "0": "\0"}
MAX_REPEAT = 1000


def regex_grammar(pattern: str) -> Grammar:
    """The grammar of the strings `pattern` fully matches; ConstraintError when unsupported."""
    return Grammar({"regex": _Parser(pattern).parse()}, "regex")


def choice_grammar(choices: list[str]) -> Grammar:
    """Exactly one of `choices`."""
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise ConstraintError("guided_choice must be a non-empty list of non-empty strings")
    return Grammar({"choice": Alt(tuple(Lit(c) for c in choices))}, "choice")


class _Parser:
    def __init__(self, pattern: str) -> None:
        self.p = pattern
        self.i = 0

    def fail(self, what: str) -> ConstraintError:
        return ConstraintError(f"regex {self.p!r}: {what} at position {self.i} is not supported")

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def take(self) -> str:
        if self.i >= len(self.p):
            raise ConstraintError(f"regex {self.p!r} ends too early")
        ch = self.p[self.i]
        self.i += 1
        return ch

    def parse(self) -> Node:
        if self.peek() == "^":
            self.i += 1
        node = self.alternation()
        if self.i < len(self.p):
            raise self.fail(f"unbalanced {self.p[self.i]!r}")
        return node

    def alternation(self) -> Node:
        options = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            options.append(self.sequence())
        return options[0] if len(options) == 1 else Alt(tuple(options))

    def sequence(self) -> Node:
        items: list[Node] = []
        while (ch := self.peek()) is not None and ch not in "|)":
            if ch == "$" and self.i == len(self.p) - 1:
                self.i += 1
                break
            items.append(self.quantified(self.atom()))
        return Seq(tuple(items))

    def atom(self) -> Node:
        ch = self.take()
        if ch == "(":
            if self.peek() == "?":
                if self.p[self.i : self.i + 2] != "?:":
                    self.i -= 1
                    raise self.fail("group syntax '(?'")
                self.i += 2
            node = self.alternation()
            if self.peek() != ")":
                raise ConstraintError(f"regex {self.p!r}: missing ')'")
            self.i += 1
            return node
        if ch == "[":
            return Chars(self.char_class())
        if ch == ".":
            return Chars(CharSet.of("\n", negate=True))
        if ch == "\\":
            return self.escape()
        if ch in "*+?":
            self.i -= 1
            raise self.fail(f"a quantifier {ch!r} with nothing to repeat")
        if ch in "^$":
            self.i -= 1
            raise self.fail(f"anchor {ch!r} inside the pattern")
        return Lit(ch)

    def escape(self) -> Node:
        ch = self.take()
        if ch.lower() in CLASSES:
            return Chars(CharSet(CLASSES[ch.lower()], negate=ch.isupper()))
        if ch in ESCAPES:
            return Lit(ESCAPES[ch])
        if ch.isalnum():
            self.i -= 2
            raise self.fail(f"escape '\\{ch}'")
        return Lit(ch)

    def char_class(self) -> CharSet:
        negate = self.peek() == "^"
        self.i += negate
        ranges: list[tuple[int, int]] = []
        first = True
        while (ch := self.take()) != "]" or first:
            first = False
            if ch == "\\":
                esc = self.escape()
                if isinstance(esc, Chars):
                    if esc.set.negate:
                        raise self.fail("a negated class escape inside [...]")
                    ranges += esc.set.ranges
                    continue
                ch = esc.text  # type: ignore[union-attr]
            if self.peek() == "-" and self.p[self.i + 1 : self.i + 2] not in ("]", ""):
                self.i += 1
                end = self.take()
                if end == "\\":
                    end = self.escape().text  # type: ignore[union-attr]
                if ord(end) < ord(ch):
                    raise self.fail(f"range {ch}-{end} (reversed)")
                ranges.append((ord(ch), ord(end)))
            else:
                ranges.append((ord(ch), ord(ch)))
        return CharSet(tuple(sorted(ranges)), negate)

    def quantified(self, node: Node) -> Node:
        ch = self.peek()
        if ch in ("?", "*", "+"):
            self.i += 1
            low, high = {"?": (0, 1), "*": (0, None), "+": (1, None)}[ch]
        elif ch == "{" and (bounds := self.braces()) is not None:
            low, high = bounds
        else:
            return node
        if self.peek() == "?":  # lazy: the same language under a full match
            self.i += 1
        if self.peek() in ("?", "*", "+") or (self.peek() == "{" and self._braces_ahead()):
            raise self.fail("a repeated quantifier")
        return Repeat(node, low, high)

    def _braces_ahead(self) -> bool:
        """Whether a {m,n} quantifier is at the cursor (the cursor stays)."""
        at = self.i
        try:
            return self.braces() is not None
        finally:
            self.i = at

    def braces(self) -> tuple[int, int | None] | None:
        """{m}, {m,}, {,n}, {,} or {m,n} at the cursor (consumed; a left-out m is 0, as in
        Python's re), or None when it is a literal '{'."""
        end = self.p.find("}", self.i)
        body = self.p[self.i + 1 : end] if end > 0 else ""
        low, comma, high = body.partition(",")
        if not (low.isdigit() or (comma and not low)) or (high and not high.isdigit()):
            return None
        lo = int(low) if low else 0
        hi = (int(high) if high else None) if comma else lo
        if (hi is not None and hi < lo) or max(lo, hi or 0) > MAX_REPEAT:
            raise self.fail(f"repeat {{{body}}} (bounds must satisfy m <= n <= {MAX_REPEAT})")
        self.i = end + 1
        return lo, hi
