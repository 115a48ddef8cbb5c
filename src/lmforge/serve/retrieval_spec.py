"""What a retrieval-augmented seq2seq model reads: its user turn + knowledge-base passages.

Such a model (stage dialogue with `retrieval`) reads its passages in its source text.
`RetrievalSpec` (retrieval.json in the model directory: passages per source, the BM25 score below
which a passage is left out, the source's token budget, the format's version: 2 with a floor, so
an lmforge from before the floor refuses the model rather than serve it without one) and
`RetrievalSpec.search` + `.source` (passages_source's layout) are the one way such a source is
made, by training (finetune.dialogue_retrieval) and by the server (serve.seq2seq_engine) alike.
The index itself is serve.retrieval's KnowledgeBase.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.errors import InputError

if TYPE_CHECKING:
    from lmforge.serve.retrieval import KnowledgeBase, Passage

__all__ = ["FLOOR_FORMAT", "RETRIEVAL_FILE", "SOURCE_FORMAT", "RetrievalSpec", "passages_source"]

SOURCE_FORMAT = 1  # passages_source's layout; a model directory records the one it was trained on
# The same layout with passages under a BM25 score left out. A spec with a floor says so, since an
# lmforge from before the floor reads format 1 only and would serve the model without it.
FLOOR_FORMAT = 2
RETRIEVAL_FILE = "retrieval.json"


def passages_source(
    question: str, passages: Sequence[str], count_tokens: Callable[[str], int], max_tokens: int
) -> str:
    """A seq2seq source: the user turn whole, then "\n[i] passage" for each passage, best first.

    The source stays within max_tokens (as count_tokens counts them) by cutting passages at word
    boundaries, never the user turn: each passage may use an equal share of the tokens still free
    (a short one leaves its rest to the next). A passage with no room in its share is left out
    and so are the ones after it, although a later one's share would be larger: a source never
    shows a lower-ranked passage without the better ones. A user turn longer than max_tokens comes
    back alone and whole."""
    source, used = question, count_tokens(question)
    for i, text in enumerate(passages, 1):
        cap = used + (max_tokens - used) // (len(passages) - i + 1)
        head, words = f"{source}\n[{i}] ", text.split()
        lo, hi, best = 1, len(words), None  # binary search: the most words within cap
        while lo <= hi:
            mid = (lo + hi) // 2
            candidate = head + " ".join(words[:mid])
            n = count_tokens(candidate)
            if n <= cap:
                lo, best = mid + 1, (candidate, n)
            else:
                hi = mid - 1
        if best is None:
            break  # the lower-ranked passages go too (docstring)
        source, used = best
    return source


@dataclass(frozen=True)
class RetrievalSpec:
    """What a retrieval-augmented seq2seq model was trained on, saved as its retrieval.json:
    sources of the user turn + the top `passages` KnowledgeBase.search results for it scoring at
    least `min_score` (BM25 on that knowledge base; 0: no floor), laid out by passages_source
    within `source_tokens` tokens."""

    passages: int
    source_tokens: int
    min_score: float = 0.0

    @property
    def format(self) -> int:
        """The version retrieval.json records: the oldest whose readers build these sources."""
        return FLOOR_FORMAT if self.min_score > 0 else SOURCE_FORMAT

    def search(self, kb: KnowledgeBase, question: str) -> list[Passage]:
        """The passages a source for question carries (the server returns them as sources)."""
        return kb.search(question, self.passages, self.min_score)

    def source(
        self, question: str, passages: Sequence[Passage], count_tokens: Callable[[str], int]
    ) -> str:
        """The source text for a user turn and its passages (training and serving alike)."""
        texts = [p.text for p in passages]
        return passages_source(question, texts, count_tokens, self.source_tokens)

    def save(self, model_dir: Path) -> None:
        (Path(model_dir) / RETRIEVAL_FILE).write_text(
            json.dumps({**asdict(self), "format": self.format}, indent=2), encoding="utf-8"
        )

    @classmethod
    def load(cls, model_dir: Path | str) -> RetrievalSpec | None:
        """The model directory's spec, or None for a model trained without passages."""
        path = Path(model_dir) / RETRIEVAL_FILE
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            fmt = raw.get("format")
            # format 1 saved before min_score existed had no floor; after, it may carry one
            if fmt in (SOURCE_FORMAT, FLOOR_FORMAT):
                min_score = float(raw.get("min_score", 0.0))
                if not 0 <= min_score < math.inf:  # NaN too: it would drop every passage
                    raise ValueError(f"min_score must be a BM25 score >= 0, got {min_score}")
                return cls(passages=int(raw["passages"]), source_tokens=int(raw["source_tokens"]),
                           min_score=min_score)  # fmt: skip
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise InputError(
                f"{path} is not a retrieval spec ({type(e).__name__}: {e}); it needs "
                '{"passages": int, "source_tokens": int, "min_score": float, "format": '
                f"{SOURCE_FORMAT} or {FLOOR_FORMAT}}}: copy it from the dialogue stage's final/ or "
                "retrain"
            ) from e
        raise InputError(
            f"{path}: the model was trained on knowledge-base source format {fmt}; this lmforge "
            f"reads formats {SOURCE_FORMAT} and {FLOOR_FORMAT} ({FLOOR_FORMAT}: with a BM25 score "
            "floor): upgrade lmforge, or retrain the model (stage dialogue with retrieval) with "
            "this version"
        )
