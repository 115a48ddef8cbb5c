"""Safety policy: block lists and patterns that refuse or redact prompts and outputs.

A policy is a YAML file of rules (see safety_default.yaml, the default policy, for the schema).
Each rule matches either `words` (case-insensitive whole words or phrases), a regex `pattern`, or
one of the data package's PII detectors (`pii: email|card|ip|phone|name`, the same patterns and
checks the data stage anonymizes with), and says what to do (`refuse` or `redact`) and where
(`prompts`, `outputs`).

Streamed output is filtered by StreamRedactor, which holds back only text that could still be
the start of a match: the `regex` module's partial matching says where a match may be in
progress at the end of the text so far, so a blocked word split across two deltas is still caught
and everything before it flows at once (no fixed-size delay).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import regex
from pydantic import Field, model_validator

from lmforge.config import Section, load_yaml, validate

__all__ = ["DEFAULT_POLICY", "SafetyPolicy", "SafetyRule", "StreamRedactor", "Verdict"]

DEFAULT_POLICY = Path(__file__).with_name("safety_default.yaml")
Action = Literal["refuse", "redact"]
Target = Literal["prompts", "outputs"]
# Characters before the unemitted text that lookbehinds (\b, (?<!\w), the PII guards, the name
# detector's cue phrases such as `(?<=\b[Mm]y name is )`) inspect, and characters after a
# complete match that its lookahead may still reject when more text comes (partial matching does
# not cover lookaheads; the longest built-in ones are the phone pattern's `(?![ .-]?\d)` and the
# name pattern's `(?![\w(]|[.:/-]\w)`: 2 characters).
CONTEXT = 16
LOOKAHEAD = 2
_FLAGS = (
    (re.IGNORECASE, regex.IGNORECASE),
    (re.MULTILINE, regex.MULTILINE),
    (re.DOTALL, regex.DOTALL),
    (re.VERBOSE, regex.VERBOSE),
)
Matcher = tuple[regex.Pattern, Callable[[str], bool] | None]


@functools.cache
def _to_regex(pattern: re.Pattern) -> regex.Pattern:
    """The same pattern compiled by `regex` (V0: re's syntax), which can match partially; once
    per process (the name detector's lexicon patterns take seconds to compile)."""
    flags = 0
    for re_flag, regex_flag in _FLAGS:
        if pattern.flags & re_flag:
            flags |= regex_flag
    return regex.compile(pattern.pattern, flags)


class SafetyRule(Section):
    """One rule: what to match (exactly one of words, pattern, pii) and what to do with it."""

    name: str = Field(description="the rule's name: reported in verdicts and /metrics")
    words: list[str] = Field(
        default_factory=list, description="words or phrases, case-insensitive, whole words only"
    )
    pattern: str | None = Field(default=None, description="a Python regular expression")
    pii: Literal["email", "card", "ip", "phone", "name"] | None = Field(
        default=None, description="one of the data stage's PII detectors (lmforge.data.pii)"
    )
    action: Action = Field(description="refuse the request / stop the output, or redact the match")
    apply_to: list[Target] = Field(
        default_factory=lambda: ["prompts", "outputs"], description="where the rule applies"
    )
    replacement: str | None = Field(
        default=None, description="text that replaces a redacted match (default [REDACTED])"
    )

    @model_validator(mode="after")
    def _one_matcher(self) -> SafetyRule:
        given = [k for k in ("words", "pattern", "pii") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                f"rule {self.name!r} needs exactly one of words, pattern, pii (got {given or 'none'})"
            )
        if self.pattern is not None:
            try:
                regex.compile(self.pattern)
            except regex.error as err:
                raise ValueError(f"rule {self.name!r}: bad regex {self.pattern!r}: {err}") from None
        if any(not w.strip() for w in self.words):
            raise ValueError(f"rule {self.name!r}: empty word in words")
        return self

    @cached_property
    def _matchers(self) -> list[Matcher]:
        if self.words:
            alts = "|".join(
                r"\s{1,4}".join(regex.escape(part) for part in w.split())
                for w in sorted(self.words, key=len, reverse=True)
            )
            return [(regex.compile(rf"(?<!\w)(?:{alts})(?!\w)", regex.IGNORECASE), None)]
        if self.pii is not None:
            from lmforge.data.pii import PII_PATTERNS

            return [(_to_regex(p), check) for p, check in PII_PATTERNS[self.pii]]
        return [(regex.compile(self.pattern or ""), None)]

    @property
    def replacement_text(self) -> str:
        if self.replacement is not None:
            return self.replacement
        if self.pii is not None:
            from lmforge.data.pii import PLACEHOLDERS

            return PLACEHOLDERS[self.pii]
        return "[REDACTED]"

    def find(self, text: str, pos: int = 0) -> list[tuple[int, int]]:
        """(start, end) of every match starting at or after pos (earlier text is context)."""
        hits = []
        for pattern, check in self._matchers:
            for m in pattern.finditer(text, pos):
                if m.end() > m.start() and (check is None or check(m.group(0))):
                    hits.append((m.start(), m.end()))
        return hits

    def pending_start(self, text: str, pos: int = 0) -> int | None:
        """Where a match that more text could still create or change begins (a partial match
        at the end, or a complete one whose lookahead has not seen enough text), or None."""
        first = None
        for pattern, _ in self._matchers:
            for m in pattern.finditer(text, pos, partial=True):
                if m.end() > m.start() and (m.partial or m.end() > len(text) - LOOKAHEAD):
                    first = m.start() if first is None else min(first, m.start())
        return first


@dataclass(frozen=True)
class Verdict:
    """What a policy decided about one text: allow, refuse or redact (text is the redacted text;
    for a refusal, the text before the refused match), and the names of the rules that matched."""

    action: Literal["allow", "refuse", "redact"]
    text: str
    rules: tuple[str, ...] = ()


class SafetyPolicy(Section):
    """A list of rules plus the fixed text a refused request is answered with."""

    rules: list[SafetyRule] = Field(default_factory=list)
    refusal_message: str = Field(
        default="I can't help with that request.",
        description="the answer to a refused prompt (finish_reason content_filter)",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> SafetyPolicy:
        names = [r.name for r in self.rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"rule names must be unique; repeated: {', '.join(dupes)}")
        return self

    @classmethod
    def from_file(cls, path: Path | str) -> SafetyPolicy:
        """Loads a policy YAML; a typo is a ConfigError naming the key and the file."""
        return validate(cls, load_yaml(Path(path)), where=str(path))

    @classmethod
    def default(cls) -> SafetyPolicy:
        """The packaged default: a small block list, API keys and PII-like patterns."""
        return cls.from_file(DEFAULT_POLICY)

    def rules_for(self, target: Target) -> list[SafetyRule]:
        return [r for r in self.rules if target in r.apply_to]

    def matches(self, text: str, target: Target, pos: int = 0) -> list[tuple[int, int, SafetyRule]]:
        """Non-overlapping matches of the target's rules from pos on, leftmost (then longest)
        first."""
        found = [(s, e, rule) for rule in self.rules_for(target) for s, e in rule.find(text, pos)]
        found.sort(key=lambda m: (m[0], -m[1]))
        chosen: list[tuple[int, int, SafetyRule]] = []
        for m in found:
            if not chosen or m[0] >= chosen[-1][1]:
                chosen.append(m)
        return chosen

    def apply_matches(
        self, text: str, target: Target, pos: int, hold: int, rules: list[str]
    ) -> tuple[str, int, bool]:
        """Applies the matches starting in text[pos:hold] (text before pos is context only):
        (the text to emit, where in `text` it ends, whether a refuse rule matched). A refusal
        emits the text before its match; otherwise the emitted text runs to `hold` or past the
        last match, whichever is further. Appends the names of matched rules to `rules`."""
        out = []
        for start, end, rule in self.matches(text, target, pos):
            if start >= hold:
                break
            if rule.name not in rules:
                rules.append(rule.name)
            out.append(text[pos:start])
            if rule.action == "refuse":
                return "".join(out), start, True
            out.append(rule.replacement_text)
            pos = end
        cut = max(pos, hold)
        out.append(text[pos:cut])
        return "".join(out), cut, False

    def _apply(self, text: str, target: Target) -> Verdict:
        rules: list[str] = []
        emitted, _, refused = self.apply_matches(text, target, 0, len(text), rules)
        action = "refuse" if refused else "redact" if rules else "allow"
        return Verdict(action, emitted, tuple(rules))

    def check_prompt(self, text: str) -> Verdict:
        """The verdict on a prompt: refuse (answer with refusal_message), redact, or allow."""
        return self._apply(text, "prompts")

    def redact_output(self, text: str) -> Verdict:
        """The verdict on a whole (non-streamed) output: `refuse` means cut at the match."""
        return self._apply(text, "outputs")


class StreamRedactor:
    """Filters a streamed output: feed(delta) returns the text that is safe to emit now, flush()
    the rest. After an output `refuse` rule matches, `refused` is True and nothing more is
    emitted (the server ends the stream with finish_reason content_filter); `rules` lists the
    rules that matched so far. Emits exactly what redact_output() makes of the whole text."""

    def __init__(self, policy: SafetyPolicy):
        self.policy = policy
        self._rules = policy.rules_for("outputs")
        self.refused = False
        self.rules: list[str] = []
        self._context = ""  # the last emitted raw characters: lookbehind context only
        self._pending = ""

    def feed(self, delta: str) -> str:
        if self.refused:
            return ""
        self._pending += delta
        return self._process(final=False)

    def flush(self) -> str:
        if self.refused:
            return ""
        return self._process(final=True)

    @property
    def verdict(self) -> str:
        return "refuse" if self.refused else ("redact" if self.rules else "allow")

    @property
    def held(self) -> int:
        """Characters received but not yet emitted."""
        return len(self._pending)

    def _process(self, final: bool) -> str:
        text = self._context + self._pending
        base = len(self._context)
        # Matches starting before `hold` are settled; from `hold` on, more text may still change
        # what matches.
        hold = len(text)
        if not final:
            for rule in self._rules:
                start = rule.pending_start(text, base)
                if start is not None:
                    hold = min(hold, start)
        emitted, cut, self.refused = self.policy.apply_matches(
            text, "outputs", base, hold, self.rules
        )
        if self.refused:
            self._pending = ""
            return emitted
        self._context = text[max(0, cut - CONTEXT) : cut]
        self._pending = text[cut:]
        return emitted
