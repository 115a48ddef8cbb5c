"""A run directory with every stage's artifacts, for testing the report without running them.

Data, tokenizer, tokens and pretrain directories are written in the formats those stages write
(stats.json funnel, tokenizer stats.json, meta.json, metrics.jsonl); the eval stage is run for
real on tiny models, so the report is tested on genuine eval.json / errors / generations.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .helpers import CORPUS, make_model_dir, trained_model_dir, write_split

STAGES = [("data", "data"), ("tokenizer", "tokenizer"), ("tokens", "tokens"),
          ("pretrain", "pretrain"), ("eval", "eval")]  # fmt: skip


def _manifest(path: Path, kind: str, metrics: dict, seconds: float) -> None:
    path.mkdir(parents=True, exist_ok=True)
    manifest = {"stage": path.name, "kind": kind, "status": "complete", "metrics": metrics,
                "duration_s": seconds, "started_at": "2026-01-01T00:00:00+00:00",
                "finished_at": "2026-01-01T00:01:00+00:00"}  # fmt: skip
    (path / "manifest.json").write_text(json.dumps(manifest))


def write_data(path: Path) -> None:
    stats = {
        "steps": [
            {"name": "clean", "documents_in": 1000, "documents_out": 990, "characters_in": 900000,
             "characters_out": 880000, "reasons": {"empty": 10}},
            {"name": "dedup", "documents_in": 990, "documents_out": 800, "characters_in": 880000,
             "characters_out": 700000, "reasons": {"exact_duplicate": 150, "near_duplicate": 40}},
            {"name": "decontam", "documents_in": 800, "documents_out": 795, "characters_in": 700000,
             "characters_out": 695000, "reasons": {"overlaps_eval": 5}},
        ],
        "splits": {"train": 755, "val": 40},
    }  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    (path / "stats.json").write_text(json.dumps(stats))
    (path / "samples").mkdir(exist_ok=True)
    (path / "samples" / "exact_duplicate.jsonl").write_text(
        json.dumps({"text": "def add(a, b):\n    return a + b  <dup & 'quoted'>"}) + "\n"
    )
    write_split(path, "train", CORPUS)
    write_split(path, "val", CORPUS[:3])
    _manifest(path, "data", {"documents": 795}, 3.2)


def write_tokenizer_and_tokens(tok: Path, tokens: Path) -> None:
    tok.mkdir(parents=True, exist_ok=True)
    stats = {"vocab_size": 300, "bytes_per_token": 2.7, "tokens_per_word": 1.4,
             "unk_rate": 0.0, "longest_tokens": ["        return", "__init__", "print"]}  # fmt: skip
    (tok / "stats.json").write_text(json.dumps(stats))
    _manifest(tok, "tokenizer", {"vocab_size": 300}, 1.5)
    tokens.mkdir(parents=True, exist_ok=True)
    meta = {"dtype": "uint16", "vocab_size": 300, "tokenizer_hash": "abc",
            "counts": {"train": 120000, "val": 6000}}  # fmt: skip
    (tokens / "meta.json").write_text(json.dumps(meta))
    _manifest(tokens, "tokens", {"train_tokens": 120000}, 0.8)


def write_pretrain(path: Path) -> None:
    trained_model_dir(path / "final")
    rows = []
    for step in range(1, 41):
        rows.append({"step": step, "loss": 5.7 * math.exp(-step / 15) + 1.0, "lr": 1e-3,
                     "tokens_seen": step * 512, "tokens_per_s": 2000 + step})  # fmt: skip
        if step % 10 == 0:
            rows.append(
                {
                    "step": step,
                    "tokens_seen": step * 512,
                    "val_loss": 5.9 * math.exp(-step / 15) + 1.2,
                }
            )
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _manifest(path, "pretrain", {"val_loss": rows[-1]["val_loss"], "tokens_seen": 20480}, 95.0)


def write_run(root: Path) -> Path:
    """root/run with data, tokenizer, tokens, pretrain (fixtures) and a real eval stage."""
    from lmforge.evals.stage import EvalConfig, evaluate

    run = root / "run"
    write_data(run / "data")
    write_tokenizer_and_tokens(run / "tokenizer", run / "tokens")
    write_pretrain(run / "pretrain")
    make_model_dir(root / "untrained")
    gen = root / "explain.jsonl"
    gen.write_text(
        "".join(json.dumps({"prompt": t[:12], "reference": t[12:]}) + "\n" for t in CORPUS[:4])
    )
    cls = root / "kinds.jsonl"
    cls.write_text(
        "".join(
            json.dumps({"text": t, "label": "code" if "(" in t else "prose"}) + "\n" for t in CORPUS
        )
    )
    cfg = EvalConfig(
        out=run / "eval",
        models=[run / "pretrain", {"name": "untrained", "path": root / "untrained"}],
        tasks=[str(run / "data"), str(gen), str(cls)],
        generation={"max_new_tokens": 6},
    )
    evaluate(cfg)
    run_json = {"name": "fake", "description": "A tiny run: every stage's artifacts.",
                "stages": [{"name": n, "kind": k} for n, k in STAGES]}  # fmt: skip
    (run / "run.json").write_text(json.dumps(run_json))
    return run
