"""A JSON schema subset compiled to a grammar whose every answer validates against the schema.

Supported: type (one or a list), object (properties, required, additionalProperties), string
(enum, const, minLength, maxLength), integer (minimum, maximum, exclusiveMinimum,
exclusiveMaximum), number, boolean, null, array (items, minItems, maxItems), enum, const, anyOf,
and local $ref to #/$defs or #/definitions (recursion included). Numbers and integers have at
most NumberDigits' digits (an integer's bounds are cut to them).
Annotations (title, description, default, ...) are ignored; any other keyword is refused with a
ConstraintError naming it and where it is, rather than producing output that may not validate;
so is a keyword beside $ref, anyOf, enum or const (all of them would apply; an enum/const may
have a type: its values of that type are kept).
Objects are written with their properties in the schema's order and no others: a property the
schema does not name is never written, even where additionalProperties (true by default) allows
it; an object schema without properties, unless additionalProperties is false, is any object.
"""

from __future__ import annotations

import json
import math
from typing import Any

from lmforge.constrain import json_grammar as jg
from lmforge.constrain.automaton import ConstraintError, Grammar
from lmforge.constrain.ir import Alt, Lit, Node, Ref

ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
     "readOnly", "writeOnly", "$defs", "definitions", "strict"}
)  # fmt: skip
KEYWORDS = {
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "minItems", "maxItems"},
    "string": {"minLength", "maxLength"},
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "number": set(),
    "boolean": set(),
    "null": set(),
}
GENERAL = {"type", "enum", "const", "anyOf", "$ref"}
RANGE = ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")


def schema_grammar(schema: Any, digits: jg.NumberDigits = jg.NumberDigits()) -> Grammar:
    """The grammar of the JSON texts valid under `schema`, its numbers within `digits` (enum and
    const values as given); ConstraintError when unsupported."""
    compiler = _SchemaCompiler(schema, digits)
    compiler.rules["schema:root"] = compiler.node(schema, "#")
    return Grammar(compiler.rules, "schema:root")


def _literal(value: Any, path: str) -> Lit:
    """An enum/const value as the JSON text it must be written as."""
    try:
        return Lit(json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False))
    except ValueError:  # Python's json reads NaN and Infinity, which are not JSON
        raise ConstraintError(f"the enum/const value {value!r} at {path} is not JSON") from None


class _SchemaCompiler:
    def __init__(self, root: Any, digits: jg.NumberDigits) -> None:
        self.root = root
        self.digits = digits
        self.rules: dict[str, Node] = jg.json_rules(digits)

    def node(self, schema: Any, path: str) -> Node:
        if schema is True or schema == {}:
            return Ref(jg.VALUE)
        if not isinstance(schema, dict):
            raise ConstraintError(f"the schema at {path} must be an object, got {schema!r}")
        types = schema.get("type")
        allowed = set(GENERAL) | ANNOTATIONS
        for t in [types] if isinstance(types, str) else types or []:
            if t not in KEYWORDS:
                raise ConstraintError(
                    f"unsupported JSON schema type {t!r} at {path}/type; supported: "
                    + ", ".join(KEYWORDS)
                )
            allowed |= KEYWORDS[t]
        for key in schema:
            if key not in allowed:
                raise ConstraintError(
                    f"unsupported JSON schema keyword {key!r} at {path}"
                    + ("" if types else " (or it needs a matching 'type')")
                )
        _check_siblings(schema, path)
        if "$ref" in schema:
            return self._ref(schema["$ref"], f"{path}/$ref")
        if "const" in schema or "enum" in schema:
            return Alt(tuple(_literal(v, path) for v in _values(schema, path)))
        if "anyOf" in schema:
            options = schema["anyOf"]
            if not isinstance(options, list) or not options:
                raise ConstraintError(f"anyOf at {path} must be a non-empty list of schemas")
            return Alt(tuple(self.node(s, f"{path}/anyOf/{i}") for i, s in enumerate(options)))
        if types is None:
            return Ref(jg.VALUE)
        if isinstance(types, list):
            return Alt(tuple(self._typed(t, schema, path) for t in types))
        return self._typed(types, schema, path)

    def _typed(self, kind: str, schema: dict[str, Any], path: str) -> Node:
        if kind == "object":
            return self._object(schema, path)
        if kind == "array":
            low, high = _bounds(schema, "minItems", "maxItems", path)
            item = self._rule(schema.get("items", True), f"{path}/items")
            return jg.listing(item, low, high)
        if kind == "string":
            return jg.string(*_bounds(schema, "minLength", "maxLength", path))
        if kind in ("integer", "number") and any(k in schema for k in RANGE):
            return self._integer_range(kind, schema, path)
        simple = {
            "integer": Ref(jg.INTEGER),
            "number": Ref(jg.NUMBER),
            "boolean": Alt((Lit("true"), Lit("false"))),
            "null": Lit("null"),
        }
        return simple[kind]

    def _object(self, schema: dict[str, Any], path: str) -> Node:
        props = schema.get("properties")
        extra = schema.get("additionalProperties", True)
        if extra not in (True, False):
            raise ConstraintError(
                f"unsupported additionalProperties schema at {path} (only true or false)"
            )
        if props is None:
            return Ref(jg.OBJECT) if extra else jg.members([])
        if not isinstance(props, dict):
            raise ConstraintError(f"properties at {path} must be an object")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise ConstraintError(f"required at {path} must be a list of property names")
        unknown = [r for r in required if r not in props]
        if unknown:
            raise ConstraintError(f"required names {unknown} at {path}, not among its properties")
        pairs = [
            (key, self._rule(sub, f"{path}/properties/{key}"), key in required)
            for key, sub in props.items()
        ]
        return jg.members(pairs)

    def _integer_range(self, kind: str, schema: dict[str, Any], path: str) -> Node:
        """An integer between the schema's bounds (exclusive ones moved to the next integer),
        within the integer digits cap."""
        if kind == "number":
            raise ConstraintError(
                f"minimum/maximum at {path} are supported on integers, not numbers; use "
                "'type': 'integer' or drop them"
            )
        bounds = {k: _bound(schema[k], f"{path}/{k}") for k in RANGE if k in schema}
        lows = [math.ceil(bounds["minimum"])] if "minimum" in bounds else []
        lows += [math.floor(bounds["exclusiveMinimum"]) + 1] if "exclusiveMinimum" in bounds else []
        highs = [math.floor(bounds["maximum"])] if "maximum" in bounds else []
        highs += [math.ceil(bounds["exclusiveMaximum"]) - 1] if "exclusiveMaximum" in bounds else []
        node = jg.integer_range(max(lows, default=None), min(highs, default=None), self.digits)
        if node is None:
            raise ConstraintError(
                f"no integer at {path} is within its bounds {bounds} and "
                f"{self.digits.integer} digits (NumberDigits.integer)"
            )
        return node

    def _rule(self, schema: Any, path: str) -> Node:
        """A subschema as its own rule: a call, so repeating it does not copy its automaton."""
        name = f"schema:{path}"
        if name not in self.rules:
            self.rules[name] = Lit("")  # placeholder while compiling (recursion through $ref)
            self.rules[name] = self.node(schema, path)
        return Ref(name)

    def _ref(self, ref: Any, path: str) -> Node:
        parts = ref.split("/") if isinstance(ref, str) else []
        if len(parts) != 3 or parts[0] != "#" or parts[1] not in ("$defs", "definitions"):
            raise ConstraintError(
                f"unsupported $ref {ref!r} at {path}: only '#/$defs/<name>' and "
                "'#/definitions/<name>'"
            )
        target = self.root.get(parts[1], {}).get(parts[2]) if isinstance(self.root, dict) else None
        if target is None:
            raise ConstraintError(f"$ref {ref!r} at {path} names no definition")
        return self._rule(target, f"#/{parts[1]}/{parts[2]}")


def _check_siblings(schema: dict[str, Any], path: str) -> None:
    """$ref, anyOf, enum and const are compiled alone, so a keyword beside them that would also
    constrain the value (all of a schema's keywords apply) is refused, not silently dropped;
    enum/const may have a `type` (_values keeps the values of that type)."""
    companions = {
        "$ref": set(),
        "anyOf": set(),
        "enum": {"type", "const"},
        "const": {"type", "enum"},
    }
    for alone, allowed in companions.items():
        if alone not in schema:
            continue
        beside = [k for k in schema if k != alone and k not in ANNOTATIONS and k not in allowed]
        if beside:
            raise ConstraintError(
                f"unsupported JSON schema: {alone!r} with {beside} beside it at {path} (all "
                f"would apply); move them into the {alone!r} schemas, or drop them"
            )


def _values(schema: dict[str, Any], path: str) -> list[Any]:
    """The values enum and const allow (both: those in each), of the schema's type if it has one."""
    values: list[Any] | None = None
    if "enum" in schema:
        values = schema["enum"]
        if not isinstance(values, list) or not values:
            raise ConstraintError(f"enum at {path} must be a non-empty list")
    if "const" in schema:
        const = _literal(schema["const"], path)
        values = (
            [schema["const"]]
            if values is None
            else [v for v in values if _literal(v, path) == const]
        )
    types = schema.get("type")
    if types is not None:
        kinds = [types] if isinstance(types, str) else types
        values = [v for v in values or [] if any(_is_type(v, k) for k in kinds)]
    if not values:
        raise ConstraintError(f"the enum/const at {path} allows no value (of its type)")
    return values


def _is_type(value: Any, kind: str) -> bool:
    """Whether a JSON value is of a JSON schema type (1.0 is an integer, true is no number)."""
    if isinstance(value, bool):
        return kind == "boolean"
    if isinstance(value, int | float):
        return kind == "number" or (kind == "integer" and float(value).is_integer())
    names = {str: "string", list: "array", dict: "object", type(None): "null"}
    return names.get(type(value)) == kind


def _bound(value: Any, path: str) -> float:
    """A minimum/maximum's value: a finite number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConstraintError(f"{path} must be a number, got {value!r}")
    return value


def _bounds(schema: dict[str, Any], low: str, high: str, path: str) -> tuple[int, int | None]:
    lo, hi = schema.get(low, 0), schema.get(high)
    if type(lo) is not int or lo < 0 or (hi is not None and (type(hi) is not int or hi < lo)):
        raise ConstraintError(f"{low}/{high} at {path} must be ints with 0 <= {low} <= {high}")
    return lo, hi
