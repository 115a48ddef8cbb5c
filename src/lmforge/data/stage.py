"""The data stage: read sources, run the steps in workers, dedup globally, decontaminate, split.

Pass 1 streams documents through the workers and spills the survivors (with their dedup keys)
to a work directory. The main process then decides exact and fuzzy duplicates over all documents
at once. Pass 2 streams the spill again and writes {train,val,test}.jsonl.zst, adding augmented
copies of train rows only (augment:) and counting demographic terms per split (bias:). Every
output is written under a temporary name and renamed when complete, so a killed run leaves
nothing that looks finished and a rerun produces the same bytes.
"""

from __future__ import annotations

import contextlib
import json
import platform
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.artifacts import run_stage
from lmforge.common.io import atomic_path, atomic_write_json, open_text, write_jsonl
from lmforge.data.augment import Augmenter, is_augmented
from lmforge.data.bias_stats import TermCounter
from lmforge.data.config import DataConfig
from lmforge.data.dedup import exact_duplicate_of, fuzzy_duplicate_of
from lmforge.data.document import Document, Reject
from lmforge.data.executors import run_batches
from lmforge.data.pipeline import SAMPLE_CHARS, Funnel
from lmforge.data.sources import check_source, iter_source
from lmforge.data.split import SPLITS, assign_fold, assign_split, mixture_copies
from lmforge.data.terms import load_groups

WORK = ".work"


class _Collector:
    """Funnel, samples (first N per step and reason, in document order) and PII counts."""

    def __init__(self, per_reason: int) -> None:
        self.funnel, self.pii, self.per_reason = Funnel(), Counter(), per_reason
        self.samples: dict[str, list[dict[str, Any]]] = {}
        self.taken: Counter = Counter()

    def sample(self, step: str, reason: str, sample: dict[str, Any]) -> None:
        if self.taken[step, reason] < self.per_reason:
            self.taken[step, reason] += 1
            self.samples.setdefault(step, []).append(sample)

    def drop(self, step: str, doc: dict[str, Any], reason: str, **extra: Any) -> None:
        self.funnel.record(step, len(doc["text"]), None, reason)
        self.sample(
            step,
            reason,
            {
                "id": doc["id"],
                "source": doc.get("source", ""),
                "reason": reason,
                **extra,
                "text": doc["text"][:SAMPLE_CHARS],
            },
        )


def _read_batches(
    cfg: DataConfig, col: _Collector, rejects: Any
) -> Iterator[list[tuple[int, Document]]]:
    """Pass-1 input: (global index, Document) batches; reader rejects go straight to rejects.jsonl."""
    batch: list[tuple[int, Document]] = []
    idx = 0
    for s, spec in enumerate(cfg.source):
        for item in iter_source(spec, cfg.text_field, cfg.max_record_bytes):
            if isinstance(item, Reject):
                col.funnel.record("read", 0, None, item.reason)
                col.sample("read", item.reason, item.to_record())
                rejects.write(
                    json.dumps({"source": spec.path, **item.to_record()}, ensure_ascii=False) + "\n"
                )
                continue
            col.funnel.record("read", len(item.text), len(item.text))
            item.meta["_source_index"] = s
            batch.append((idx, item))
            idx += 1
            if len(batch) >= cfg.batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


def _pass_one(
    cfg: DataConfig, ctx: Any, work: Path, col: _Collector
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Runs the per-document steps; spills kept records; returns (exact keys, signatures, overlaps)."""
    keys, overlaps = [], []
    sig_path = work / "sigs.u32"
    with (
        atomic_path(ctx.out / "rejects.jsonl") as rej_tmp,
        open(rej_tmp, "w", encoding="utf-8") as rejects,
        open_text(work / "kept.jsonl.zst", "wt") as spill,
        open(sig_path, "wb") as sig_fh,
        ctx.progress("data", unit="docs") as bar,
    ):
        batches = _read_batches(cfg, col, rejects)
        for res in run_batches(
            batches,
            cfg.model_dump(mode="json", exclude_unset=True),
            cfg.executor,
            cfg.workers,
            cfg.address,
        ):
            col.funnel.merge(res["funnel"])
            col.pii.update(res["pii"])
            for step, reason, sample in res["samples"]:
                col.sample(step, reason, sample)
            for rej in res["rejects"]:
                rejects.write(json.dumps(rej, ensure_ascii=False) + "\n")
            for rec in res["records"]:
                spill.write(json.dumps(rec, ensure_ascii=False) + "\n")
            keys.append(res["keys"])
            overlaps.append(
                np.asarray(res["overlaps"], dtype=np.int64)
            )  # arrays, not ints: compact
            if res["sigs"] is not None:
                sig_fh.write(res["sigs"].tobytes())
            bar.advance(sum(r["docs_in"] for s, r in res["funnel"].items() if s == "extract"))
    n = sum(len(k) for k in keys)
    all_keys = np.concatenate(keys) if keys else np.zeros(0, dtype=np.uint64)
    sigs = (
        np.memmap(sig_path, dtype=np.uint32, mode="r", shape=(n, cfg.dedup.num_perm))
        if cfg.dedup.fuzzy and n
        else None
    )
    return all_keys, sigs, np.concatenate(overlaps) if overlaps else np.zeros(0, dtype=np.int64)


def _dedup(
    cfg: DataConfig, keys: np.ndarray, sigs: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """(exact, fuzzy): for each spilled document, the index of the copy that is kept, or -1."""
    d, none = cfg.dedup, np.full(len(keys), -1, dtype=np.int64)
    exact = exact_duplicate_of(keys) if d.exact else none
    if not (d.fuzzy and sigs is not None):
        return exact, none
    return exact, fuzzy_duplicate_of(sigs, exact < 0, d.bands, d.rows, d.threshold)


def _pass_two(
    cfg: DataConfig,
    ctx: Any,
    work: Path,
    col: _Collector,
    dup_of: tuple[np.ndarray, np.ndarray],
    overlaps: np.ndarray,
) -> tuple[dict[str, int], dict[str, Any]]:
    """Applies dedup, decontamination, mixture weights and the split; writes the three shards.

    Returns the split sizes and the augmentation / bias-term stats of what was written.
    """
    exact, fuzzy = dup_of
    originals = set(exact[exact >= 0].tolist()) | set(fuzzy[fuzzy >= 0].tolist())
    ids: dict[int, str] = {}  # ids of kept originals, for "duplicate_of" in the samples
    weights = [s.weight for s in cfg.source]
    mixing = any(w != 1 for w in weights)
    ratios = (cfg.split.train, cfg.split.val, cfg.split.test)
    counts = dict.fromkeys(SPLITS, 0)
    with contextlib.ExitStack() as stack:
        outs = {}
        for name in SPLITS:
            tmp = stack.enter_context(atomic_path(ctx.out / f"{name}.jsonl.zst"))
            outs[name] = stack.enter_context(open_text(tmp, "wt"))
        writer = _SplitWriter(cfg, outs, counts)
        with open_text(work / "kept.jsonl.zst") as spill:
            for i, line in enumerate(spill):
                rec = json.loads(line)
                chars = len(rec["text"])
                if i in originals:
                    ids[i] = rec["id"]
                if cfg.dedup.exact:
                    if exact[i] >= 0:
                        col.drop(
                            "exact_dedup", rec, "exact_duplicate", duplicate_of=ids[int(exact[i])]
                        )
                        continue
                    col.funnel.record("exact_dedup", chars, chars)
                if cfg.dedup.fuzzy:
                    if fuzzy[i] >= 0:
                        col.drop(
                            "fuzzy_dedup", rec, "near_duplicate", duplicate_of=ids[int(fuzzy[i])]
                        )
                        continue
                    col.funnel.record("fuzzy_dedup", chars, chars)
                if cfg.decontam.enabled and cfg.decontam.eval_sets:
                    if overlaps[i] and cfg.decontam.mode == "drop":
                        col.drop(
                            "decontam",
                            rec,
                            "eval_ngram_overlap",
                            overlapping_ngrams=int(overlaps[i]),
                        )
                        continue
                    col.funnel.record("decontam", chars, chars, None)
                    if overlaps[i]:
                        col.funnel.steps["decontam"]["dropped"]["reported_not_dropped"] += 1
                key = rec["text"]
                copies = mixture_copies(key, weights[rec.pop("_source_index")], cfg.split.seed)
                if mixing and copies == 0:
                    col.drop("mixture", rec, "subsampled_by_weight")
                    continue
                if mixing:
                    col.funnel.record("mixture", chars, chars * copies)
                split = assign_split(key, ratios, cfg.split.seed)
                if cfg.split.folds:
                    rec["fold"] = assign_fold(key, cfg.split.folds, cfg.split.seed)
                writer.write(split, rec, copies)
            writer.flush()
    return counts, writer.stats()


class _SplitWriter:
    """Writes rows to their split; adds augmented copies of train rows; counts bias terms.

    Augmentation happens here, after the split is decided, and only for train rows: no copy of
    a val/test document can be trained on and no augmented row can be evaluated.
    """

    def __init__(self, cfg: DataConfig, outs: dict[str, Any], counts: dict[str, int]) -> None:
        self.outs, self.counts = outs, counts
        self.augmenter = Augmenter(cfg.augment) if cfg.augment.enabled else None
        self.pending: list[dict[str, Any]] = []
        self.batch = cfg.batch_size
        self.label_field = cfg.bias.label_field
        self.terms = None
        if cfg.bias.enabled:
            groups = load_groups(cfg.bias.terms, cfg.bias.groups or None)
            self.terms = {name: TermCounter(groups) for name in SPLITS}

    def write(self, split: str, rec: dict[str, Any], copies: int = 1) -> None:
        row = json.dumps(rec, ensure_ascii=False) + "\n"
        for _ in range(copies):
            self.outs[split].write(row)
        self.counts[split] += copies
        if self.terms is not None:
            self.terms[split].add(rec["text"], rec.get(self.label_field), copies)
        if self.augmenter is not None and split == "train" and not is_augmented(rec):
            self.pending.append(rec)
            if len(self.pending) >= self.batch:
                self.flush()

    def flush(self) -> None:
        """Writes the augmented copies of the train rows seen since the last flush."""
        if not self.pending:
            return
        rows, self.pending = self.pending, []
        for aug in self.augmenter.augment(rows, "train"):  # type: ignore[union-attr]
            self.write("train", aug)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.augmenter is not None:
            out["augment"] = {
                "rows": dict(self.augmenter.counts),
                "synonyms": self.augmenter.synonym_source,
            }
        if self.terms is not None:
            out["bias"] = {name: c.to_dict() for name, c in self.terms.items()}
        return out


def _clear_leftovers(out: Path) -> Path:
    """Removes the work dir and temp files a killed run may have left; returns a fresh work dir."""
    work = out / WORK
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(out / "samples", ignore_errors=True)  # an older config's samples must not linger
    for tmp in out.glob(".*.tmp*"):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    work.mkdir(parents=True)
    return work


def build(cfg: DataConfig, ctx: Any) -> dict[str, Any]:
    """Runs the whole pipeline into ctx.out; returns headline metrics for the manifest."""
    for spec in cfg.source:
        check_source(spec)
    work = _clear_leftovers(Path(ctx.out))
    col = _Collector(cfg.samples_per_reason)
    keys, sigs, overlaps = _pass_one(cfg, ctx, work, col)
    dup_of = _dedup(cfg, keys, sigs)
    del sigs
    counts, written = _pass_two(cfg, ctx, work, col, dup_of, overlaps)
    funnel = col.funnel.to_dict()
    read = funnel.get("read", {"docs_in": 0, "docs_out": 0, "chars_out": 0})
    docs_out = sum(counts.values())
    stats = {
        "python": platform.python_version(),
        "sources": [s.model_dump() for s in cfg.source],
        "documents_in": read["docs_out"],
        "rejects": read["docs_in"] - read["docs_out"],
        "documents_out": docs_out,
        "splits": counts,
        "steps": funnel,
        "pii": dict(col.pii),
        **written,
    }
    for step, rows in col.samples.items():
        write_jsonl(ctx.out / "samples" / f"{step}.jsonl", rows)
    atomic_write_json(ctx.out / "stats.json", stats)
    shutil.rmtree(work, ignore_errors=True)
    return {
        "documents_in": stats["documents_in"],
        "documents_out": docs_out,
        "rejects": stats["rejects"],
        "exact_duplicates": int((dup_of[0] >= 0).sum()),
        "near_duplicates": int((dup_of[1] >= 0).sum()),
        "python": platform.python_version(),
        **{f"{k}_docs": v for k, v in counts.items()},
        **{f"augmented_{k}": v for k, v in written.get("augment", {}).get("rows", {}).items()},
    }


def prepare(cfg: DataConfig | dict[str, Any], force: bool = False) -> Path:
    """The public API: runs (or reuses) the data stage and returns its output directory."""
    if not isinstance(cfg, DataConfig):
        from lmforge.config import validate

        cfg = validate(DataConfig, cfg)
    return run_stage("data", cfg, build, force=force).out
