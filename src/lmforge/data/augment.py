"""Data augmentation of training rows: EDA operations and back-translation, after the split only.

An augmented row is a copy of a training row (label and every other field carried over) with a
new text, marked `augmented: "eda-swap"` (or eda-synonym, eda-insert, eda-delete,
backtranslate) and `source_id`: the id of the row it came from. Augmentation is not a
per-document pipeline step: `Augmenter.augment` takes the split its rows belong to and refuses
anything but train, and the data stage calls it only after assigning the split, so an augmented
row (or a paraphrase of a val/test row) can never reach val or test. Consumers that split data
themselves (finetune's validation share and k-fold) use `separate_augmented` and
`attach_augmented` so augmented rows follow their source into training and never into a
held-out part.

Every augmented text depends only on (seed, source id, method, copy), never on the order rows
arrive in, so reruns and any batching give the same rows.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import xxhash
from pydantic import Field

from lmforge.config import Section
from lmforge.data.eda import OPERATIONS
from lmforge.data.synonyms import Synonyms, SynonymSourceName
from lmforge.errors import ConfigError, InputError

Method = Literal["synonym", "insert", "swap", "delete", "backtranslate"]
MARK, SOURCE = "augmented", "source_id"


class AugmentConfig(Section):
    """The `augment:` section (data stage and finetune): what to add to the training rows."""

    enabled: bool = Field(False, description="add augmented copies of the training rows")
    methods: list[Method] = Field(
        ["synonym", "insert", "swap", "delete"],
        description="EDA synonym|insert|swap|delete and/or backtranslate (needs pivot)",
    )
    alpha: float = Field(0.1, gt=0, le=1, description="share of each text's words an op touches")
    copies: int = Field(1, ge=1, description="augmented rows per training row and method")
    synonyms: SynonymSourceName = Field(
        "auto", description="auto (WordNet when installed, else built-in) | wordnet | builtin"
    )
    pivot: list[Path] = Field(
        [], description="backtranslate: local seq2seq dirs [to_pivot, back_to_source]"
    )
    max_new_tokens: int = Field(64, ge=1, description="backtranslate: tokens per translation")
    seed: int = Field(0, description="seed of every random choice")
    compare: bool = Field(
        True, description="finetune k-fold: also train each fold without augmentation (a table)"
    )

    def inputs(self) -> list[Path]:
        """Pivot model dirs: their content decides the cache of a stage that augments."""
        return list(self.pivot) if self.enabled and "backtranslate" in self.methods else []


def row_id(row: dict[str, Any], text_field: str = "text") -> str:
    """A row's `id`, or a hash of its text for records without one (finetune JSONL)."""
    if row.get("id") is not None:
        return str(row["id"])
    return "text:" + xxhash.xxh3_64_hexdigest(str(row[text_field]).encode())


def is_augmented(row: dict[str, Any]) -> bool:
    return bool(row.get(MARK))


class Augmenter:
    """Makes the augmented copies of training rows (`augment`), and counts them per method."""

    def __init__(self, cfg: AugmentConfig, text_field: str = "text") -> None:
        if "backtranslate" in cfg.methods and not cfg.pivot:
            raise ConfigError("augment.methods has backtranslate but augment.pivot is empty")
        self.cfg, self.text_field = cfg, text_field
        needs_syn = {"synonym", "insert"} & set(cfg.methods)
        self.syn = Synonyms(cfg.synonyms) if needs_syn else None
        self._back = None
        self.counts: Counter = Counter()

    @property
    def synonym_source(self) -> str | None:
        return self.syn.name if self.syn else None

    def _rng(self, source: str, method: str, copy: int) -> random.Random:
        return random.Random(
            xxhash.xxh3_64_intdigest(f"{source}|{method}|{copy}".encode(), self.cfg.seed)
        )

    def _copy(self, row: dict[str, Any], source: str, method: str, copy: int, text: str) -> dict:
        mark = "backtranslate" if method == "backtranslate" else f"eda-{method}"
        out = {**row, self.text_field: text, MARK: mark, SOURCE: source}
        if "id" in row:
            out["id"] = f"{source}#{mark}-{copy}"
        return out

    def augment(self, rows: list[dict[str, Any]], split: str) -> list[dict[str, Any]]:
        """The augmented copies of `rows` (not the rows themselves), in row order.

        Raises ConfigError for any split but "train": augmenting before or outside the training
        split would let copies of held-out rows into training, or copies into held-out data.
        Rows that are already augmented, and copies identical to their source, are skipped.
        """
        if split != "train":
            raise ConfigError(
                f"augmentation applies to the training split only, not '{split}': augment after "
                "splitting, so no copy of a val/test row is trained on and none is evaluated"
            )
        todo = []
        for i, row in enumerate(rows):
            if is_augmented(row):
                continue
            if not isinstance(row.get(self.text_field), str):
                raise InputError(
                    f"augment: row {i + 1} (id {row.get('id', '?')}) has no text field "
                    f"'{self.text_field}'"
                )
            todo.append(row)
        out: list[dict[str, Any]] = []
        back = self._back_translate(todo) if "backtranslate" in self.cfg.methods else None
        for k, row in enumerate(todo):
            source, text = row_id(row, self.text_field), row[self.text_field]
            for method in self.cfg.methods:
                for c in range(self.cfg.copies):
                    if method == "backtranslate":
                        if c:  # greedy decoding gives one paraphrase per row
                            break
                        new = back[k]  # type: ignore[index]
                    else:
                        op = OPERATIONS[method]
                        new = op(text, self.cfg.alpha, self._rng(source, method, c), self.syn)
                    if new and new != text:
                        out.append(self._copy(row, source, method, c, new))
                        self.counts[out[-1][MARK]] += 1
        return out

    def _back_translate(self, rows: list[dict[str, Any]]) -> list[str]:
        if self._back is None:
            from lmforge.data.backtranslate import BackTranslator

            self._back = BackTranslator(self.cfg.pivot, self.cfg.max_new_tokens)
        return self._back([r[self.text_field] for r in rows])


def separate_augmented(rows: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """(original rows, augmented rows): split and fold only the originals."""
    return [r for r in rows if not is_augmented(r)], [r for r in rows if is_augmented(r)]


def attach_augmented(
    train: list[dict[str, Any]], augmented: list[dict[str, Any]], text_field: str = "text"
) -> list[dict[str, Any]]:
    """train plus the augmented rows whose source is in train (copies of held-out rows go)."""
    if not augmented:
        return train
    ids = {row_id(r, text_field) for r in train}
    return train + [r for r in augmented if r.get(SOURCE) in ids]


def refuse_augmented(rows: list[dict[str, Any]], where: str) -> None:
    """InputError when held-out data holds augmented rows (they would inflate its scores)."""
    bad = next((i for i, r in enumerate(rows) if is_augmented(r)), None)
    if bad is not None:
        raise InputError(
            f"{where} record {bad + 1} is augmented ({rows[bad][MARK]}); held-out data must hold "
            "original rows only: use the data stage's val/test split, which is never augmented"
        )
