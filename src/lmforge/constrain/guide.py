"""A request's constraint: what it asks for (kind + spec) and its compiled token guide.

`Guide` is what SamplingParams carries: its fields (kind, spec) are all that is recorded or
hashed (dataclasses.asdict sees only them: the response cache key and the feedback store's row),
and `tokens` is the compiled TokenGuide over the engine's vocabulary. Compiling is cached per
tokenizer (the vocabulary's trie is built once) and per (kind, spec), so the n choices of one
request, and repeated requests with one schema, share one guide and its mask cache.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmforge.constrain.automaton import Automaton, ConstraintError, Grammar
from lmforge.constrain.json_grammar import NumberDigits, json_object_grammar
from lmforge.constrain.json_schema import schema_grammar
from lmforge.constrain.masker import TokenGuide, Vocabulary
from lmforge.constrain.regex import choice_grammar, regex_grammar
from lmforge.constrain.vocab import token_bytes

# each kind's grammar from its spec, JSON numbers within the digits given
GRAMMARS: dict[str, Callable[[str, NumberDigits], Grammar]] = {
    "json_object": lambda spec, digits: json_object_grammar(digits),
    "json_schema": lambda spec, digits: schema_grammar(json.loads(spec), digits),
    "regex": lambda spec, digits: regex_grammar(spec),
    "choice": lambda spec, digits: choice_grammar(json.loads(spec)),
}
GUIDE_CACHE = 16  # compiled guides kept per vocabulary (each up to MASK_CACHE_BYTES of masks)
# A guide's memoized states and steps grow with every new state its answers reach (json_object:
# one per new nesting of brackets): about 13 KB an automaton state besides the masks (some 3.4
# byte-table rows of 1 KB, states inside a split UTF-8 character included, the table grown
# twofold, plus the automaton's memoized steps; benchmarks/bench_guided_cold.py --memory-walks
# 150, 50k byte-level BPE: 1,208 states, 15.6 MB), so about 130 MB at this bound; a cached
# guide past this many automaton states is dropped, and the next request compiles anew
MAX_GUIDE_STATES = 10_000
NUMBER_DIGITS = NumberDigits()  # a guide's JSON numbers, unless its GuideCompiler is given others
GUIDE_WARM_SECONDS = 1.0  # the server's budget for a new guide's first masks (TokenGuide.warm;
# 0.5 s did not reliably shorten the engine's cold walks at 50k tokens, docs/benchmarks.md)


@dataclass(frozen=True)
class Guide:
    """A constraint on the answer: kind (a GRAMMARS key) and its spec as canonical text."""

    kind: str
    spec: str

    @property
    def compiled(self) -> bool:
        return "_tokens" in self.__dict__

    @property
    def tokens(self) -> TokenGuide:
        """The compiled guide (not a field: never hashed, copied or recorded)."""
        tokens = self.__dict__.get("_tokens")
        if tokens is None:
            raise ConstraintError(f"the {self.kind} constraint is not compiled (GuideCompiler)")
        return tokens


def _bound(kind: str, spec: str, tokens: TokenGuide) -> Guide:
    guide = Guide(kind, spec)
    object.__setattr__(guide, "_tokens", tokens)
    return guide


def spec_text(kind: str, value: Any) -> str:
    """A constraint's value as its canonical spec text (a schema's key order is kept: it is the
    order the properties are written in)."""
    if kind == "regex":
        return value
    if kind == "json_object":
        return ""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class GuideCompiler:
    """Compiles constraints over one tokenizer's vocabulary, keeping the latest guides; the JSON
    numbers they allow have at most `number_digits` digits in each part."""

    def __init__(self, tokenizer: Any, number_digits: NumberDigits = NUMBER_DIGITS) -> None:
        self.vocab = Vocabulary(token_bytes(tokenizer))
        self.number_digits = number_digits
        self._guides: OrderedDict[tuple[str, str], TokenGuide] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, kind: str, spec: str, warm_seconds: float = 0.0) -> Guide:
        """The Guide for (kind, spec); ConstraintError names what is wrong with it. A newly
        compiled one first spends up to `warm_seconds` computing its first masks (TokenGuide.warm;
        the server's worker thread does, so the engine's thread does not)."""
        key = (kind, spec)
        with self._lock:
            tokens = self._guides.get(key)
            if tokens is not None and tokens.automaton.size > MAX_GUIDE_STATES:
                del self._guides[key]  # rows still using it keep it until they end
            elif tokens is not None:
                self._guides.move_to_end(key)
                return _bound(kind, spec, tokens)
        if kind not in GRAMMARS:
            raise ConstraintError(f"unknown constraint kind {kind!r}; one of {sorted(GRAMMARS)}")
        tokens = TokenGuide(Automaton(GRAMMARS[kind](spec, self.number_digits)), self.vocab)
        if warm_seconds > 0:
            tokens.warm(warm_seconds)  # while no other thread sees it
        with self._lock:
            self._guides[key] = tokens
            if len(self._guides) > GUIDE_CACHE:
                self._guides.popitem(last=False)
        return _bound(kind, spec, tokens)


_COMPILERS: dict[int, tuple[weakref.ref, GuideCompiler]] = {}  # id(files) -> (files, compiler)
_COMPILERS_LOCK = threading.Lock()


def compiler_for(files: Any) -> GuideCompiler:
    """The GuideCompiler of a TokenizerFiles (built on first use: the trie of its vocabulary),
    kept while the TokenizerFiles lives."""
    key = id(files)
    with _COMPILERS_LOCK:
        entry = _COMPILERS.get(key)
        if entry is not None and entry[0]() is files:
            return entry[1]
        compiler = GuideCompiler(files.tokenizer)
        _COMPILERS[key] = (weakref.ref(files, lambda _: _COMPILERS.pop(key, None)), compiler)
        return compiler
