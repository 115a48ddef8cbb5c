"""The character automata accept exactly their languages: JSON (against Python's json), the
JSON-schema subset (against jsonschema), regexes (against re.fullmatch) and choices; unsupported
constructs are refused naming what is unsupported."""

from __future__ import annotations

import json
import random
import re

import pytest

from lmforge.constrain import Automaton, ConstraintError
from lmforge.constrain.json_grammar import json_object_grammar
from lmforge.constrain.json_schema import schema_grammar
from lmforge.constrain.regex import choice_grammar, regex_grammar
from lmforge.errors import ConfigError

JSON_TEXTS = [
    "{}", "{ }", '{"a":1}', '{"a": 1}', '{"a": -0.5e3}', '{"a": 0}', '{"a": 1E+10}',
    '{"a": [1, 2.25, -0, true, false, null]}', '{"a": []}', '{"a": [ ]}', '{"": ""}',
    '{"a": {"b": {"c": [{}]}}}', '{"é": "日本語 ü"}', '{"a": "x\\"y\\\\z\\n\\u00e9\\/"}',
    '{"a": 1, "a": 2}', '{\n"a": 1\n}', '{"emoji": "🙂"}',
    # not JSON
    "", "[]", '"a"', "{", "}", '{"a"}', '{"a":}', '{"a":1,}', '{,}', '{"a":01}', '{"a":1.}',
    '{"a":.5}', '{"a":+1}', '{"a":-}', '{"a":1e}', '{"a":"\\x"}', '{"a":"\\u12"}',
    '{"a":"tab\there"}', "{'a':1}", '{"a":tru}', '{"a":True}', '{"a":[1,]}', '{"a":[,1]}',
    '{"a":1}}', '{"a":1} ', ' {"a":1}', '{"a":NaN}',
]  # fmt: skip


def _refuse(name: str) -> None:
    raise ValueError(f"{name} is not JSON (RFC 8259)")


def is_json_object(text: str) -> bool:
    """Python's json, strict: no NaN/Infinity, no surrounding whitespace."""
    try:
        return isinstance(json.loads(text, parse_constant=_refuse), dict) and text == text.strip()
    except ValueError:
        return False


def test_json_object_matches_pythons_json_where_whitespace_is_bounded():
    auto = Automaton(json_object_grammar())
    for text in JSON_TEXTS:
        assert auto.matches(text) == is_json_object(text), text
    # whitespace: at most one space or newline per place JSON allows it
    assert auto.matches('{ "a": 1 }') and not auto.matches('{  "a": 1}')
    for empty in ("{  }", "{\n }", '{"a": [ \n]}'):  # empty brackets: one whitespace, too
        assert not auto.matches(empty) and is_json_object(empty), empty
    optional = Automaton(schema_grammar({"type": "object", "properties": {"a": {}, "b": {}}}))
    assert optional.matches("{ }") and optional.matches('{ "b": 1 }')
    assert not optional.matches("{  }") and not optional.matches('{"a": 1,}')
    assert not Automaton(schema_grammar({"type": "array", "maxItems": 3})).matches("[ \n]")
    assert not auto.matches('{"a":\t1}')  # valid JSON, but not a whitespace the grammar writes


def test_unicode_escapes_pair_surrogates_and_count_a_pair_as_one_character():
    auto = Automaton(json_object_grammar())
    for text in [
        '{"a":"\\ud83d\\ude00"}',
        '{"a":"\\uD83D\\uDE00x"}',
        '{"a":"\\ud7ff\\ue000\\u00E9"}',
    ]:
        assert auto.matches(text), text
        json.loads(text)["a"].encode("utf-8")  # a parsed answer is text UTF-8 can hold
    for text in [
        '{"a":"\\ud83d"}',
        '{"a":"\\ude00"}',
        '{"a":"\\ude00\\ud83d"}',
        '{"a":"\\ud83dx"}',
    ]:
        assert not auto.matches(text), text  # a lone surrogate
    one = Automaton(schema_grammar({"type": "string", "minLength": 1, "maxLength": 1}))
    assert one.matches('"\\ud83d\\ude00"') and len(json.loads('"\\ud83d\\ude00"')) == 1
    assert not Automaton(schema_grammar({"type": "string", "minLength": 2})).matches(
        '"\\ud83d\\ude00"'
    )


def test_json_nesting_is_bounded_not_unlimited():
    auto = Automaton(json_object_grammar())
    assert auto.matches('{"a":' + "[" * 20 + "]" * 20 + "}")
    assert not auto.matches('{"a":' + "[" * 80 + "]" * 80 + "}")  # past MAX_DEPTH


SCHEMA = {
    "type": "object",
    "title": "Person",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 4, "description": "d"},
        "age": {"type": "integer"},
        "score": {"type": ["number", "null"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 2},
        "kind": {"anyOf": [{"const": "x"}, {"type": "boolean"}]},
        "extra": {"type": "object"},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
SCHEMA_TEXTS = [
    '{"name":"bo","age":3}', '{"name": "bob", "age": -12}', '{"name":"ab\\"c","age":0}',
    '{"name":"bo","age":3,"score":null}', '{"name":"bo","age":3,"score":-1.5e2}',
    '{"name":"bo","age":3,"tags":["a"]}', '{"name":"bo","age":3,"tags":["a","b"]}',
    '{"name":"bo","age":3,"kind":"x"}', '{"name":"bo","age":3,"kind":false}',
    '{"name":"bo","age":3,"extra":{"q":[1]}}', '{"name":"日本","age":3,"score":2,"kind":true}',
    # invalid (or out of the fixed property order)
    '{"name":"bo"}', '{"age":3}', '{"name":"","age":3}', '{"name":"bobby","age":3}',
    '{"name":"bo","age":3.5}', '{"name":"bo","age":3,"tags":[]}',
    '{"name":"bo","age":3,"tags":["a","b","a"]}', '{"name":"bo","age":3,"tags":["c"]}',
    '{"name":"bo","age":3,"kind":"y"}', '{"name":"bo","age":3,"other":1}',
    '{"name":"bo","age":3,"extra":[]}', '{"name":"bo","age":3,}', '{"name":"bo",,"age":3}',
    '{"age":3,"name":"bo"}',
]  # fmt: skip


def test_schema_grammar_accepts_only_valid_documents():
    import jsonschema

    auto = Automaton(schema_grammar(SCHEMA))
    accepted = [t for t in SCHEMA_TEXTS if auto.matches(t)]
    assert len(accepted) == 11  # the first eleven
    assert accepted == SCHEMA_TEXTS[:11]
    for text in accepted:
        jsonschema.validate(json.loads(text), SCHEMA)
    # the one valid document refused is out of the schema's property order (documented)
    jsonschema.validate(json.loads('{"age":3,"name":"bo"}'), SCHEMA)


def test_schema_refs_recursion_enum_const_and_empty_schema():
    tree = {
        "$defs": {"Node": {"type": "object", "properties": {
            "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/Node"}}},
            "required": ["v"]}},
        "$ref": "#/$defs/Node",
    }  # fmt: skip
    auto = Automaton(schema_grammar(tree))
    assert auto.matches('{"v":1,"kids":[{"v":2},{"v":3,"kids":[]}]}')
    assert not auto.matches('{"v":1,"kids":[{"w":2}]}')
    assert Automaton(schema_grammar({"enum": ["a", 1, None, [1]]})).matches("[1]")
    assert not Automaton(schema_grammar({"enum": ["a", 1]})).matches('"b"')
    assert Automaton(schema_grammar({"const": {"k": "é"}})).matches('{"k":"é"}')
    # enum/const with a type: the values of that type (JSON's: 1.0 is an integer, true no number)
    typed = Automaton(schema_grammar({"type": "integer", "enum": ["1", 1.0, 2, True, 2.5]}))
    assert [typed.matches(t) for t in ('"1"', "1.0", "2", "true", "2.5")] == [0, 1, 1, 0, 0]
    both = Automaton(schema_grammar({"enum": ["a", "b"], "const": "b"}))
    assert both.matches('"b"') and not both.matches('"a"')
    anything = Automaton(schema_grammar({}))
    assert anything.matches('[1,{"a":null}]') and anything.matches('"s"')


def test_a_pydantic_models_schema_compiles_and_its_answers_validate():
    from typing import Literal

    from pydantic import BaseModel, Field

    class Item(BaseModel):  # pydantic writes $ref + default, const + type, anyOf with null
        name: str = Field(description="n", max_length=5)
        kind: Literal["a"]
        note: str | None = None
        sub: Item | None = None

    auto = Automaton(schema_grammar(Item.model_json_schema()))
    text = '{"name":"x","kind":"a","note":null,"sub":{"name":"y","kind":"a","sub":null}}'
    assert auto.matches(text) and Item.model_validate_json(text).sub.name == "y"
    assert not auto.matches('{"name":"x","kind":"b"}')


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "string", "pattern": "a+"}, "'pattern' at #"),
        ({"type": "object", "properties": {"a": {"type": "number", "minimum": 0}}},
         "'minimum' at #/properties/a"),
        ({"type": ["integer", "number"], "minimum": 0}, "supported on integers, not numbers"),
        ({"type": "integer", "exclusiveMinimum": True}, "exclusiveMinimum must be a number"),
        ({"type": "integer", "minimum": 2.5, "maximum": 2.9}, "no integer at # is within"),
        ({"type": "integer", "minimum": 10**19}, "19 digits (NumberDigits.integer)"),
        ({"oneOf": [{"type": "string"}]}, "'oneOf' at #"),
        ({"type": "date"}, "type 'date' at #/type"),
        ({"$ref": "http://x/s.json"}, "unsupported $ref"),
        ({"type": "object", "additionalProperties": {"type": "string"}}, "additionalProperties"),
        ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "['b']"),
        ({"type": "array", "minItems": 3, "maxItems": 1}, "minItems/maxItems"),
        ({"type": "string", "maxLength": 10**6}, "too large"),
        ({"type": "object", "properties": {"a": {}}, "required": "a"}, "must be a list"),
        # keywords beside $ref/anyOf/enum/const would apply too: refused, never dropped
        ({"$defs": {"A": {"type": "integer"}}, "$ref": "#/$defs/A", "type": "string"},
         "'$ref' with ['type']"),
        ({"type": "object", "properties": {"a": {}}, "anyOf": [{"type": "object"}]},
         "'anyOf' with ['type', 'properties']"),
        ({"type": "string", "enum": ["ab", "c"], "maxLength": 1}, "'enum' with ['maxLength']"),
        ({"type": "string", "enum": [1, None]}, "allows no value"),
        ({"enum": ["a"], "const": "b"}, "allows no value"),
        ({"enum": [1, float("nan")]}, "value nan at # is not JSON"),  # json.loads reads NaN
    ],
)  # fmt: skip
def test_unsupported_schema_is_refused_naming_the_keyword(schema, named):
    with pytest.raises(ConstraintError) as err:
        Automaton(schema_grammar(schema))
    assert named in str(err.value)


REGEX_CASES = {
    r"[a-c]{2,4}-\d+": ["ab-1", "cccc-0099", "a-1", "abcab-1", "ab-", "AB-1"],
    r"(foo|ba[rz])+\.?": ["foo", "barbaz.", "foo..", "", "fooba"],
    r"\w+@\w+\.(com|org)": ["a_b@x.com", "a@b.org", "a@b.net", "@b.com"],
    r"^-?(0|[1-9]\d*)(\.\d+)?$": ["0", "-12.50", "01", "1.", "-"],
    r"[^a-z\s]x*?y{0,2}": ["Axyy", "1", "ax", " x", "Zyyy"],
    r"(?:a|b)*c": ["c", "abababc", "abd"],
    r"\{\d\}|.": ["{1}", "q", "\n", "{}"],
    r"colou?r [A-Z][a-z]{1,}": ["color Red", "colour Xy", "colour X", "colr Red"],
    r"x{,2}y{,}z{}": ["z{}", "xxz{}", "yyyz{}", "xxxz{}", "z"],  # {,n}: from 0, as re has it
}


@pytest.mark.parametrize("pattern", list(REGEX_CASES))
def test_regex_matches_exactly_what_re_fullmatch_matches(pattern):
    auto = Automaton(regex_grammar(pattern))
    for text in REGEX_CASES[pattern]:
        assert auto.matches(text) == bool(re.fullmatch(pattern, text, re.ASCII)), text


@pytest.mark.parametrize(
    ("pattern", "named"),
    [(r"(?=a)b", "group syntax '(?'"), (r"(a)\1", "escape '\\1'"), (r"\bword", "escape '\\b'"),
     (r"a**", "repeated quantifier"), (r"*a", "nothing to repeat"), (r"(ab", "missing ')'"),
     (r"a{5,2}", "repeat {5,2}"), (r"a^b", "anchor '^'"), (r"a{2}{3}", "repeated quantifier"),
     (r"a*{2}", "repeated quantifier")],
)  # fmt: skip
def test_unsupported_regex_is_refused_naming_the_construct(pattern, named):
    with pytest.raises(ConstraintError) as err:
        regex_grammar(pattern)
    assert named in str(err.value)


def test_choice_accepts_only_whole_choices():
    auto = Automaton(choice_grammar(["yes", "no", "yes please"]))
    assert [auto.matches(t) for t in ["yes", "no", "yes please", "ye", "yes ", "nope"]] == [
        True, True, True, False, False, False,
    ]  # fmt: skip
    with pytest.raises(ConstraintError, match="non-empty list"):
        choice_grammar([])


def test_json_numbers_have_at_most_the_digits_allowed_in_each_part():
    from lmforge.constrain.json_grammar import NumberDigits

    auto = Automaton(json_object_grammar(NumberDigits(integer=3, fraction=2, exponent=1)))
    for ok in ['{"a":123}', '{"a":-999.99e+9}', '{"a":0.5E-1}', '{"a":[100,-0.01]}']:
        assert auto.matches(ok), ok
    for too_long in ['{"a":1234}', '{"a":0.123}', '{"a":1e12}', '{"a":[1,-1000]}']:
        assert not auto.matches(too_long), too_long
    default = Automaton(json_object_grammar())  # 19 / 17 / 3
    assert default.matches('{"a":' + "9" * 19 + "." + "1" * 17 + "e-308}")
    for too_long in ("9" * 20, "1." + "1" * 18, "1e1000"):
        assert not default.matches('{"a":' + too_long + "}"), too_long
    for name in ("integer", "fraction", "exponent"):
        with pytest.raises(ConfigError, match=f"NumberDigits.{name} must be an int >= 1"):
            NumberDigits(**{name: 0})


def test_schema_numbers_are_capped_but_enum_and_const_numbers_are_written_as_given():
    import jsonschema

    from lmforge.constrain.json_grammar import NumberDigits

    schema = {"type": "object", "properties": {
        "n": {"type": "number"}, "i": {"type": ["integer", "null"]},
        "k": {"enum": [123456789, 0.000001]}, "c": {"const": -1.5e300}},
        "required": ["n", "i", "k", "c"]}  # fmt: skip
    auto = Automaton(schema_grammar(schema, NumberDigits(integer=4, fraction=3, exponent=2)))
    valid = '{"n":-12.5e10,"i":9999,"k":123456789,"c":-1.5e+300}'
    assert auto.matches(valid)
    jsonschema.validate(json.loads(valid), schema)
    assert auto.matches('{"n":0.001,"i":null,"k":1e-06,"c":-1.5e+300}')  # json.dumps' spelling
    for too_long in ('"n":12345,"i":1', '"n":1.5,"i":12345', '"n":1.0001,"i":1', '"n":1e100,"i":1'):
        assert not auto.matches("{" + too_long + ',"k":123456789,"c":-1.5e+300}'), too_long


def test_integer_bounds_allow_exactly_the_integers_between_them():
    import jsonschema

    from lmforge.constrain.json_grammar import NumberDigits

    cases = [
        ({"minimum": -15, "maximum": 230}, -15, 230),
        ({"exclusiveMinimum": -1, "exclusiveMaximum": 100}, 0, 99),
        ({"minimum": 0.5, "maximum": 7.5}, 1, 7),
        ({"minimum": 1, "exclusiveMinimum": 3, "maximum": 1000, "exclusiveMaximum": 999}, 4, 998),
        ({"maximum": -7}, -9999, -7),  # the other side: the digits cap
        ({"minimum": 50}, 50, 9999),
    ]
    for bounds, low, high in cases:
        schema = {"type": "integer", **bounds}
        auto = Automaton(schema_grammar(schema, NumberDigits(integer=4)))
        for value in [*range(-10010, 10010, 13), *range(-300, 300), low - 1, low, high, high + 1]:
            assert auto.matches(str(value)) == (low <= value <= high), (bounds, value)
            if auto.matches(str(value)):
                jsonschema.validate(value, schema)
        assert not auto.matches("-0") and not auto.matches("007"), bounds
    optional = {"type": ["integer", "null"], "minimum": 3}
    auto = Automaton(schema_grammar(optional))
    assert auto.matches("null") and auto.matches("3") and not auto.matches("2")
    assert auto.matches("9" * 19) and not auto.matches("1" + "0" * 19)  # default cap


def canonical_integers(cap: int) -> list[str]:
    """Every string of an optional minus and 1 to cap + 1 digits (leading zeros, "-0" and one
    digit past the cap included), and a few near misses."""
    from itertools import product

    bodies = ["".join(p) for n in range(1, cap + 2) for p in product("0123456789", repeat=n)]
    return [*bodies, *("-" + b for b in bodies), "", "-", "+1", "1.0", "1e1", " 1", "--1"]


BOUND_TESTS = {
    "minimum": lambda v, b: v >= b, "exclusiveMinimum": lambda v, b: v > b,
    "maximum": lambda v, b: v <= b, "exclusiveMaximum": lambda v, b: v < b,
}  # fmt: skip


def test_integer_bounds_match_a_brute_force_check_of_every_short_numeral():
    """Random schemas' bounds (inclusive or exclusive, int or fractional, negative, 0, at and
    past the digit cap) allow exactly the numerals of an int written without leading zeros or
    "-0", within the cap, that meet every bound as JSON schema states it; bounds no such int
    meets are refused."""
    from lmforge.constrain.json_grammar import NumberDigits

    cap = 2
    texts = canonical_integers(cap)
    edges = [0, 1, -1, 9, -9, 10, -10, 98, 99, 100, -99, -100, 150, -150, 0.5, -0.5, 99.5, -99.5]
    rng = random.Random(0)
    compiled = refused = 0
    for trial in range(120):
        bounds = {k: rng.choice(edges) if trial % 2 else rng.randint(-120, 120)
                  for k in BOUND_TESTS if rng.random() < 0.45} or {"minimum": rng.choice(edges)}  # fmt: skip

        def valid(text: str, bounds=bounds) -> bool:
            if not re.fullmatch(r"-?\d+", text) or str(int(text)) != text:  # 007, -0, +1, 1.0
                return False
            value = int(text)
            return abs(value) < 10**cap and all(BOUND_TESTS[k](value, b) for k, b in bounds.items())

        schema = {"type": "integer", **bounds}
        if not any(valid(t) for t in texts):
            with pytest.raises(ConstraintError, match="no integer at # is within its bounds"):
                schema_grammar(schema, NumberDigits(integer=cap))
            refused += 1
            continue
        auto = Automaton(schema_grammar(schema, NumberDigits(integer=cap)))
        for text in texts:
            assert auto.matches(text) == valid(text), (bounds, text)
        compiled += 1
    assert compiled > 60 and refused > 20
