"""The dialogue stage's retrieval augmentation: each source is the user turn plus its top
knowledge-base passages, laid out by serve.retrieval_spec.RetrievalSpec.source -- the function the
serving engine formats chat sources with -- and recall@k of those passages on held-out dialogues.

The index and the layout are read through serve.retrieval and serve.retrieval_spec (leaf modules:
SQLite and the data readers), the one place finetune reaches into serve, because training and
serving must share that one function.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

from lmforge.tokenizer.files import TokenizerFiles

if TYPE_CHECKING:
    from lmforge.finetune.dialogue import DialogueConfig


class Retrieved:
    """A split's sources: each user turn alone, or with its passages as the server lays them out
    (RetrievalSpec.source), plus the passages' sources (function names) for recall."""

    def __init__(self, rows: list[dict[str, Any]], tok: TokenizerFiles, spec: Any, kb: Any):
        if spec is None:
            self.sources, self.found = [r["context"] for r in rows], [[] for _ in rows]
            return
        count = lambda text: len(tok.encode(text))  # noqa: E731
        self.sources, self.found = [], []
        for r in rows:
            passages = spec.search(kb, r["context"])
            self.sources.append(spec.source(r["context"], passages, count))
            self.found.append([p.source for p in passages])


def recall_at_k(rows: list[dict[str, Any]], found: list[list[str]]) -> dict[str, float]:
    """Per intent and "all": the share of dialogues about a function whose function's passage
    was among the passages retrieved for the user turn."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for row, sources in zip(rows, found, strict=True):
        if row.get("function"):
            hits[row["intent"]].append(row["function"] in sources)
            hits["all"].append(row["function"] in sources)
    return {k: round(sum(v) / len(v), 4) for k, v in sorted(hits.items())}


def retrieve(cfg: DialogueConfig, tok: TokenizerFiles,
             splits: dict[str, list[dict[str, Any]]]) -> tuple[Any, dict[str, Retrieved]]:  # fmt: skip
    """(RetrievalSpec or None, each split's sources) for the config's retrieval section."""
    if cfg.retrieval.kb is None:
        return None, {s: Retrieved(rows, tok, None, None) for s, rows in splits.items()}
    from lmforge.serve.recipe_config import open_kb
    from lmforge.serve.retrieval_spec import RetrievalSpec

    spec = RetrievalSpec(passages=cfg.retrieval.passages, source_tokens=cfg.train.seq_len - 1,
                         min_score=cfg.retrieval.min_score)  # fmt: skip
    kb = open_kb(cfg.retrieval.kb)
    try:
        return spec, {s: Retrieved(rows, tok, spec, kb) for s, rows in splits.items()}
    finally:
        kb.close()
