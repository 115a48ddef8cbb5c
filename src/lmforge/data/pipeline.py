"""The per-document half of the pipeline: steps, the funnel they feed, and one batch of work.

A step is any callable `step(doc) -> None | reason` with a `name`: None keeps the document (the
step may have rewritten its text), a string drops it and names why (datatrove style). Workers run
`process_batch` on batches of (index, Document); it returns the kept records with their dedup and
decontamination keys, plus funnel counts and samples, all keyed by the global index so the main
process can merge results deterministically whatever the worker count.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from lmforge.data.clean import CleanStep
from lmforge.data.config import LENIENT, DataConfig, QualityConfig
from lmforge.data.decontam import Decontaminator
from lmforge.data.dedup import exact_key
from lmforge.data.document import Document
from lmforge.data.language import LanguageStep
from lmforge.data.minhash import MinHasher
from lmforge.data.pii import PiiStep
from lmforge.data.quality import C4Filter, FineWebFilter, GopherQuality, GopherRepetition, ProseOnly
from lmforge.data.web import HTML, extract_html

SAMPLE_CHARS = 2000


class Step(Protocol):
    name: str

    def __call__(self, doc: Document) -> str | None: ...


@dataclass
class ExtractStep:
    """Main-content extraction for HTML documents (others pass through untouched)."""

    name: str = "extract"

    def __call__(self, doc: Document) -> str | None:
        if doc.meta.get("content_type") != HTML:
            return None
        del doc.meta["content_type"]
        text = extract_html(doc.text)
        if text is None:
            return "html_no_content"
        doc.text = text
        return None


@dataclass
class Funnel:
    """Documents and characters in/out per step, and drop reasons with counts."""

    steps: dict[str, dict[str, Any]] = field(default_factory=dict)

    def _row(self, step: str) -> dict[str, Any]:
        return self.steps.setdefault(
            step, {"docs_in": 0, "chars_in": 0, "docs_out": 0, "chars_out": 0, "dropped": Counter()}
        )

    def record(
        self, step: str, chars_in: int, chars_out: int | None, reason: str | None = None
    ) -> None:
        row = self._row(step)
        row["docs_in"] += 1
        row["chars_in"] += chars_in
        if reason is None:
            row["docs_out"] += 1
            row["chars_out"] += chars_out or 0
        else:
            row["dropped"][reason] += 1

    def merge(self, other: dict[str, dict[str, Any]]) -> None:
        for step, r in other.items():
            row = self._row(step)
            for k in ("docs_in", "chars_in", "docs_out", "chars_out"):
                row[k] += r[k]
            row["dropped"].update(r["dropped"])

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {
            s: {**r, "dropped": dict(sorted(r["dropped"].items(), key=lambda kv: -kv[1]))}
            for s, r in self.steps.items()
        }


def _quality_kwargs(section: Any, preset: str, name: str) -> dict[str, Any]:
    """A filter's thresholds: explicit keys win, then the preset, then the paper default."""
    values = section.model_dump()
    if preset == "lenient":
        for key, value in LENIENT.get(name, {}).items():
            if key not in section.model_fields_set:
                values[key] = value
    return values


def quality_steps(q: QualityConfig) -> list[Step]:
    """The enabled quality filters in their fixed order."""
    steps: list[Step] = []
    for name, cls in (
        ("gopher_quality", GopherQuality),
        ("gopher_repetition", GopherRepetition),
        ("c4", C4Filter),
        ("fineweb", FineWebFilter),
    ):
        kw = _quality_kwargs(getattr(q, name), q.preset, name)
        if kw.pop("enabled"):
            steps.append(cls(**kw))
    if q.prose_only:
        steps.append(ProseOnly())
    return steps


def build_steps(cfg: DataConfig) -> list[Step]:
    """The per-document steps a config asks for, in pipeline order."""
    steps: list[Step] = [ExtractStep()]
    if cfg.clean.enabled:
        steps.append(CleanStep(**cfg.clean.model_dump(exclude={"enabled"})))
    if cfg.language.enabled:
        steps.append(LanguageStep(cfg.language.languages, cfg.language.threshold))
    steps += quality_steps(cfg.quality)
    if cfg.pii.enabled:
        steps.append(PiiStep(**cfg.pii.model_dump(exclude={"enabled"})))
    return steps


class Worker:
    """Everything a worker process holds: the steps, the MinHasher, the eval-set n-grams."""

    def __init__(self, cfg: DataConfig) -> None:
        self.steps = build_steps(cfg)
        self.samples_per_reason = cfg.samples_per_reason
        self.hasher = (
            MinHasher(cfg.dedup.num_perm, cfg.dedup.ngram, cfg.dedup.seed)
            if cfg.dedup.fuzzy
            else None
        )
        dc = cfg.decontam
        self.decontam = (
            Decontaminator.from_files(dc.eval_sets, dc.ngram)
            if dc.enabled and dc.eval_sets
            else None
        )

    def process_batch(self, batch: list[tuple[int, Document]]) -> dict[str, Any]:
        """Runs the steps over a batch; returns kept records + keys, funnel, samples, rejects."""
        funnel, samples, rejects = Funnel(), [], []
        taken: Counter = Counter()
        kept_idx, records, keys, overlaps = [], [], [], []
        for idx, doc in batch:
            reason = None
            for step in self.steps:
                before = len(doc.text)
                reason = step(doc)
                funnel.record(step.name, before, len(doc.text), reason)
                if reason is not None:
                    sample = {
                        "index": idx,
                        "id": doc.id,
                        "source": doc.source,
                        "reason": reason,
                        "text": doc.text[:SAMPLE_CHARS],
                    }
                    if taken[step.name, reason] < self.samples_per_reason:
                        taken[step.name, reason] += 1
                        samples.append((step.name, reason, sample))
                    if step.name == "extract":
                        rejects.append(
                            {
                                "where": doc.id,
                                "reason": reason,
                                "detail": "page has no main content",
                            }
                        )
                    break
            if reason is not None:
                continue
            kept_idx.append(idx)
            records.append(doc.to_record())
            keys.append(exact_key(doc.text))
            overlaps.append(self.decontam.overlap(doc.text) if self.decontam else 0)
        sigs = (
            self.hasher.signatures([r["text"] for r in records])
            if self.hasher and records
            else None
        )
        pii = Counter()
        for step in self.steps:
            if isinstance(step, PiiStep):
                pii, step.counts = step.counts, Counter()
        return {
            "index": kept_idx,
            "records": records,
            "keys": np.array(keys, dtype=np.uint64),
            "sigs": sigs,
            "overlaps": overlaps,
            "funnel": funnel.to_dict(),
            "samples": samples,
            "rejects": rejects,
            "pii": dict(pii),
        }


_WORKER: Worker | None = None
_INIT_ERROR: Exception | None = None


def init_worker(cfg_data: dict[str, Any], defer_errors: bool = False) -> None:
    """Builds this process's Worker from the config's JSON form.

    As a process-pool initializer it must not raise (defer_errors=True): multiprocessing replaces
    a worker whose initializer fails with a new one, forever, so a missing eval set hung the
    stage printing tracebacks. The error is kept and raised by the first run_batch instead,
    which hands it to the parent like any batch error.
    """
    global _WORKER, _INIT_ERROR
    try:
        _WORKER = Worker(DataConfig.model_validate(cfg_data))
    except Exception as exc:
        if not defer_errors:
            raise
        _INIT_ERROR = exc


def run_batch(batch: list[tuple[int, Document]]) -> dict[str, Any]:
    """Pool entry point (module-level so it pickles)."""
    if _INIT_ERROR is not None:
        raise _INIT_ERROR
    assert _WORKER is not None, "init_worker was not called in this process"
    return _WORKER.process_batch(batch)
