"""Heuristic quality filters: Gopher (quality + repetition), C4 and FineWeb, with paper defaults.

Each filter is a small callable returning None (keep) or a drop reason naming the rule that
fired, e.g. "gopher_min_words". Defaults are the published values (Gopher: Rae et al. 2021,
appendix A; C4: Raffel et al. 2020 and its released code; FineWeb: Penedo et al. 2024); every one
is a config key. `ProseOnly` optionally drops code and tables.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from lmforge.data.document import Document

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "*", "-", "–", "‣", "⁃")
ELLIPSES = ("...", "…")
TERMINAL_PUNCT = (".", "!", "?", '"', "'", "”", "’")
C4_POLICY = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)
_ALPHA = re.compile(r"[^\W\d_]")
_PARAS = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")


def _dup_fraction(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, fraction of their characters)."""
    seen: set[str] = set()
    dup_n = dup_chars = total_chars = 0
    for item in items:
        total_chars += len(item)
        if item in seen:
            dup_n += 1
            dup_chars += len(item)
        seen.add(item)
    return dup_n / max(len(items), 1), dup_chars / max(total_chars, 1)


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return list(zip(*(words[i:] for i in range(n)), strict=False))


@dataclass
class GopherQuality:
    """Gopher quality rules: length, word length, symbols, bullets, ellipses, alpha words, stop words."""

    min_words: int = 50
    max_words: int = 100_000
    min_avg_word_length: float = 3.0
    max_avg_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2
    name: str = "gopher_quality"

    def __call__(self, doc: Document) -> str | None:
        words = doc.text.split()
        n = len(words)
        if n < self.min_words:
            return "gopher_min_words"
        if n > self.max_words:
            return "gopher_max_words"
        avg = sum(len(w) for w in words) / n
        if avg < self.min_avg_word_length:
            return "gopher_min_avg_word_length"
        if avg > self.max_avg_word_length:
            return "gopher_max_avg_word_length"
        symbols = doc.text.count("#") + sum(doc.text.count(e) for e in ELLIPSES)
        if symbols / n > self.max_symbol_word_ratio:
            return "gopher_symbol_word_ratio"
        lines = [ln.strip() for ln in doc.text.split("\n") if ln.strip()]
        if (
            lines
            and sum(ln.startswith(BULLETS) for ln in lines) / len(lines)
            > self.max_bullet_lines_ratio
        ):
            return "gopher_bullet_lines"
        if (
            lines
            and sum(ln.endswith(ELLIPSES) for ln in lines) / len(lines)
            > self.max_ellipsis_lines_ratio
        ):
            return "gopher_ellipsis_lines"
        if sum(bool(_ALPHA.search(w)) for w in words) / n < self.min_alpha_words_ratio:
            return "gopher_alpha_words"
        if len(STOP_WORDS.intersection(w.lower() for w in words)) < self.min_stop_words:
            return "gopher_stop_words"
        return None


@dataclass
class GopherRepetition:
    """Gopher repetition rules: duplicate lines/paragraphs and top/duplicate n-gram fractions."""

    max_dup_line_frac: float = 0.3
    max_dup_para_frac: float = 0.3
    max_dup_line_char_frac: float = 0.2
    max_dup_para_char_frac: float = 0.2
    top_ngram_max: dict[int, float] = field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    dup_ngram_max: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )
    name: str = "gopher_repetition"

    def __call__(self, doc: Document) -> str | None:
        text = doc.text
        paras = [p.strip() for p in _PARAS.split(text) if p.strip()]
        frac, char_frac = _dup_fraction(paras)
        if frac > self.max_dup_para_frac:
            return "gopher_dup_para_frac"
        if char_frac > self.max_dup_para_char_frac:
            return "gopher_dup_para_char_frac"
        lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
        frac, char_frac = _dup_fraction(lines)
        if frac > self.max_dup_line_frac:
            return "gopher_dup_line_frac"
        if char_frac > self.max_dup_line_char_frac:
            return "gopher_dup_line_char_frac"
        words = text.lower().split()
        total_chars = sum(len(w) for w in words) or 1
        for n, limit in sorted(self.top_ngram_max.items()):
            grams = Counter(_ngrams(words, n))
            if grams:
                gram, count = grams.most_common(1)[0]
                if count > 1 and count * sum(len(w) for w in gram) / total_chars > limit:
                    return f"gopher_top_{n}gram"
        for n, limit in sorted(self.dup_ngram_max.items()):
            if self._dup_ngram_char_frac(words, n) / total_chars > limit:
                return f"gopher_dup_{n}gram"
        return None

    @staticmethod
    def _dup_ngram_char_frac(words: list[str], n: int) -> int:
        """Characters of words covered by n-grams that occur more than once (each word counted once)."""
        seen: set[tuple[str, ...]] = set()
        covered = [False] * len(words)
        for i, gram in enumerate(_ngrams(words, n)):
            if gram in seen:
                for j in range(i, i + n):
                    covered[j] = True
            seen.add(gram)
        return sum(len(w) for w, c in zip(words, covered, strict=True) if c)


@dataclass
class C4Filter:
    """C4 rules: drops boilerplate lines, then documents that are too short or look like code."""

    min_words_per_line: int = 3
    min_sentences: int = 5
    max_word_length: int = 1000
    require_terminal_punct: bool = True
    drop_curly_bracket: bool = True
    drop_lorem_ipsum: bool = True
    drop_javascript_lines: bool = True
    drop_policy_lines: bool = True
    name: str = "c4"

    def __call__(self, doc: Document) -> str | None:
        low = doc.text.lower()
        if self.drop_lorem_ipsum and "lorem ipsum" in low:
            return "c4_lorem_ipsum"
        if self.drop_curly_bracket and "{" in doc.text:
            return "c4_curly_bracket"
        kept = []
        for line in doc.text.split("\n"):
            line = line.strip()
            words = line.split()
            lowl = line.lower()
            if not line or (self.require_terminal_punct and not line.endswith(TERMINAL_PUNCT)):
                continue
            if len(words) < self.min_words_per_line or any(
                len(w) > self.max_word_length for w in words
            ):
                continue
            if self.drop_javascript_lines and "javascript" in lowl:
                continue
            if self.drop_policy_lines and any(p in lowl for p in C4_POLICY):
                continue
            kept.append(line)
        if not kept:
            return "c4_no_lines_left"
        if len(_SENTENCE_END.findall("\n".join(kept))) < self.min_sentences:
            return "c4_min_sentences"
        doc.text = "\n".join(kept)
        return None


@dataclass
class FineWebFilter:
    """FineWeb line rules: punctuated lines, short lines, duplicated-line chars, newline ratio."""

    min_line_punct_ratio: float = 0.12
    max_short_line_ratio: float = 0.67
    short_line_length: int = 30
    max_char_dup_ratio: float = 0.01
    max_newline_word_ratio: float = 0.3
    name: str = "fineweb"

    def __call__(self, doc: Document) -> str | None:
        lines = [ln.strip() for ln in doc.text.split("\n") if ln.strip()]
        if not lines:
            return "fineweb_empty"
        if (
            sum(ln.endswith(TERMINAL_PUNCT) for ln in lines) / len(lines)
            < self.min_line_punct_ratio
        ):
            return "fineweb_line_punct_ratio"
        if (
            sum(len(ln) <= self.short_line_length for ln in lines) / len(lines)
            > self.max_short_line_ratio
        ):
            return "fineweb_short_lines"
        _, char_frac = _dup_fraction(lines)
        if char_frac > self.max_char_dup_ratio:
            return "fineweb_char_dup_ratio"
        if doc.text.count("\n") / max(len(doc.text.split()), 1) > self.max_newline_word_ratio:
            return "fineweb_newline_ratio"
        return None


_CODE_LINE = re.compile(
    r"^(>>>|\.\.\. |\$ |def |class |import |from \S+ import|return\b|#include)|[;{}]\s*$|^\s*[)\]}]"
)
_TABLE_LINE = re.compile(r"^\s*(\|.*\||\+[-=+]+\+|[-=]{3,}(\s+[-=]{3,})+)\s*$")


@dataclass
class ProseOnly:
    """Drops documents where code or table lines exceed a fraction of the lines."""

    max_code_lines_ratio: float = 0.2
    max_table_lines_ratio: float = 0.2
    name: str = "prose_only"

    def __call__(self, doc: Document) -> str | None:
        lines = [ln for ln in doc.text.split("\n") if ln.strip()]
        if not lines:
            return None
        if (
            sum(bool(_CODE_LINE.search(ln)) for ln in lines) / len(lines)
            > self.max_code_lines_ratio
        ):
            return "prose_only_code"
        if (
            sum(bool(_TABLE_LINE.match(ln)) for ln in lines) / len(lines)
            > self.max_table_lines_ratio
        ):
            return "prose_only_table"
        return None
