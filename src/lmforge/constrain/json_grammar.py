"""JSON's grammar (RFC 8259) as grammar rules: any value, and the pieces schemas reuse.

Whitespace is bounded: at most one space or newline where JSON allows whitespace (after `{`, `[`,
`:` and `,`, and before `}` and `]`), so a weak model cannot spend its whole answer on blanks.
Numbers are bounded too (NumberDigits: the most digits of the integer part, the fraction and the
exponent), so a sampled model cannot write digits forever and never close the object.
A `\\u` escape of a surrogate must be a high-low pair (one character, as a schema's string lengths
count it): RFC 8259's grammar also lets a lone surrogate through, which no UTF-8 text can hold.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.constrain.automaton import Grammar
from lmforge.constrain.ir import Alt, Chars, CharSet, Lit, Members, Node, Ref, Repeat, optional, seq
from lmforge.errors import ConfigError

WS = optional(Chars(CharSet.of(" \n")))
DIGIT = Chars(CharSet(((ord("0"), ord("9")),)))
HEX = Chars(CharSet(((ord("0"), ord("9")), (ord("a"), ord("f")), (ord("A"), ord("F")))))
# a \u escape: a code point outside the surrogates, or a high and a low surrogate as one pair (a
# lone surrogate is no Unicode character: it would not encode to UTF-8 once parsed)
_D = Chars(CharSet.of("dD"))
U_ESCAPE = Alt(
    (
        seq("\\u", Chars(CharSet.of("0123456789abcefABCEF")), HEX, HEX, HEX),
        seq("\\u", _D, Chars(CharSet.of("01234567")), HEX, HEX),
        seq(
            "\\u",
            _D,
            Chars(CharSet.of("89abAB")),
            HEX,
            HEX,
            "\\u",
            _D,
            Chars(CharSet.of("cdefCDEF")),
            HEX,
            HEX,
        ),
    )
)
ESCAPE = "json:escape"  # a rule, called: a string's maxLength copies one call, not its ~20 nodes
# one character of a string's content: unescaped (not ", \ or a control character) or an escape
STRING_CHAR = Alt(
    (
        Chars(CharSet(((0, 0x1F), (ord('"'), ord('"')), (ord("\\"), ord("\\"))), negate=True)),
        Ref(ESCAPE),
    )
)
COMMA = seq(WS, ",", WS)

# rule names of the generic JSON grammar, shared by every grammar that embeds it
VALUE, OBJECT, ARRAY, STRING = "json:value", "json:object", "json:array", "json:string"
INTEGER, NUMBER = "json:integer", "json:number"


@dataclass(frozen=True)
class NumberDigits:
    """The most digits a JSON number may have in its integer part (any int64 fits in 19), its
    fraction (17 round-trip any double) and its exponent (a double's is at most 308). A
    schema's enum and const numbers are written as given, whatever their length."""

    integer: int = 19
    fraction: int = 17
    exponent: int = 3

    def __post_init__(self) -> None:
        for name in ("integer", "fraction", "exponent"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ConfigError(f"NumberDigits.{name} must be an int >= 1, got {value!r}")


def integer(digits: NumberDigits) -> Node:
    """A JSON integer: an optional minus, then 0 or up to digits.integer digits not led by 0."""
    nonzero = Chars(CharSet(((ord("1"), ord("9")),)))
    return seq(
        optional(Lit("-")), Alt((Lit("0"), seq(nonzero, Repeat(DIGIT, 0, digits.integer - 1))))
    )


def integer_range(low: int | None, high: int | None, digits: NumberDigits) -> Node | None:
    """A JSON integer in [low, high] (None: unbounded on that side), written without leading
    zeros or "-0", its digits within digits.integer; None when no such integer exists."""
    top = 10**digits.integer - 1
    low = -top if low is None else max(low, -top)
    high = top if high is None else min(high, top)
    if low > high:
        return None
    options = []
    if low < 0:  # the negatives, as "-" and their magnitudes
        options.append(seq("-", _natural_range(max(-high, 1), -low)))
    if high >= 0:
        options.append(_natural_range(max(low, 0), high))
    return options[0] if len(options) == 1 else Alt(tuple(options))


def _natural_range(low: int, high: int) -> Node:
    """The decimal numerals of the integers in [low, high], 0 <= low <= high: one fixed-length
    range per number of digits."""
    options = []
    for length in range(len(str(low)), len(str(high)) + 1):
        a = max(low, 10 ** (length - 1) if length > 1 else 0)
        b = min(high, 10**length - 1)
        options.append(_same_length_range(str(a), str(b)))
    return options[0] if len(options) == 1 else Alt(tuple(options))


def _same_length_range(low: str, high: str) -> Node:
    """The numerals from `low` to `high`, both of one length, digit by digit: the common prefix,
    then low's first digit with anything at or above low's rest, the first digits between them
    with any rest, and high's first digit with anything at or below high's rest (a side whose
    rest is all zeros or all nines joins the middle, so the nodes grow with the square of the
    length, not exponentially)."""
    size = len(low)
    if low == "0" * size and high == "9" * size:
        return Repeat(DIGIT, size, size)
    if low == high:
        return Lit(low)
    if size == 1:
        return Chars(CharSet(((ord(low), ord(high)),)))
    if low[0] == high[0]:
        return seq(low[0], _same_length_range(low[1:], high[1:]))
    rest = size - 1
    first = int(low[0]) + (low[1:] != "0" * rest)  # the middle's first digits: first..last
    last = int(high[0]) - (high[1:] != "9" * rest)
    options: list[Node] = []
    if first > int(low[0]):
        options.append(seq(low[0], _same_length_range(low[1:], "9" * rest)))
    if first <= last:
        middle = Chars(CharSet(((ord("0") + first, ord("0") + last),)))
        options.append(seq(middle, Repeat(DIGIT, rest, rest)))
    if last < int(high[0]):
        options.append(seq(high[0], _same_length_range("0" * rest, high[1:])))
    return options[0] if len(options) == 1 else Alt(tuple(options))


def number(digits: NumberDigits) -> Node:
    """A JSON number: an integer, an optional fraction and an optional exponent, each part
    within its digits."""
    sign = optional(Chars(CharSet.of("+-")))
    return seq(
        Ref(INTEGER),
        optional(seq(".", Repeat(DIGIT, 1, digits.fraction))),
        optional(seq(Chars(CharSet.of("eE")), sign, Repeat(DIGIT, 1, digits.exponent))),
    )


def string(min_length: int = 0, max_length: int | None = None) -> Node:
    """A JSON string whose decoded length is in [min_length, max_length]."""
    return seq('"', Repeat(STRING_CHAR, min_length, max_length), '"')


def enclosed(open_: str, body: Node, close: str, may_be_empty: bool) -> Node:
    """`body` (never empty) between brackets, or, if it may be empty, the brackets alone: one
    whitespace at most either way."""
    full = seq(open_, WS, body, WS, close)
    return Alt((seq(open_, WS, close), full)) if may_be_empty else full


def listing(item: Node, min_items: int = 0, max_items: int | None = None) -> Node:
    """`item`s between brackets, comma-separated, their count in [min_items, max_items]."""
    if max_items == 0:
        return seq("[", WS, "]")
    rest = Repeat(
        seq(COMMA, item), max(min_items - 1, 0), None if max_items is None else max_items - 1
    )
    return enclosed("[", seq(item, rest), "]", may_be_empty=min_items == 0)


def members(pairs: list[tuple[str, Node, bool]]) -> Node:
    """An object with these (key, value, required) members in this order, no others."""
    import json

    if not pairs:
        return seq("{", WS, "}")
    nodes = tuple(
        (seq(json.dumps(key, ensure_ascii=False), WS, ":", WS, value), req)
        for key, value, req in pairs
    )
    return enclosed("{", Members(nodes, COMMA), "}", may_be_empty=not any(r for *_, r in pairs))


def json_rules(digits: NumberDigits) -> dict[str, Node]:
    """The rules for any JSON value (objects with any keys, arrays of any values), its numbers
    within `digits`."""
    member = seq(Ref(STRING), WS, ":", WS, Ref(VALUE))
    literals = (Lit("true"), Lit("false"), Lit("null"))
    return {
        VALUE: Alt((Ref(OBJECT), Ref(ARRAY), Ref(STRING), Ref(NUMBER), *literals)),
        OBJECT: enclosed("{", seq(member, Repeat(seq(COMMA, member), 0, None)), "}", True),
        ARRAY: listing(Ref(VALUE)),
        STRING: string(),
        ESCAPE: Alt((seq("\\", Chars(CharSet.of('"\\/bfnrt'))), U_ESCAPE)),
        INTEGER: integer(digits),
        NUMBER: number(digits),
    }


def json_object_grammar(digits: NumberDigits = NumberDigits()) -> Grammar:
    """OpenAI's json_object mode: the answer is one JSON object."""
    return Grammar(json_rules(digits), OBJECT)
