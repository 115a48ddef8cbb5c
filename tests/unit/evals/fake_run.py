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
    """stats.json and samples/ exactly as lmforge.data.stage writes them."""
    stats = {
        "documents_in": 1000, "rejects": 2, "documents_out": 795,
        "splits": {"train": 755, "val": 40},
        "steps": {
            "read": {"docs_in": 1002, "chars_in": 900000, "docs_out": 1000, "chars_out": 900000,
                     "dropped": {"bad_utf8": 2}},
            "clean": {"docs_in": 1000, "chars_in": 900000, "docs_out": 990, "chars_out": 880000,
                      "dropped": {"empty": 10}},
            "exact_dedup": {"docs_in": 990, "chars_in": 880000, "docs_out": 800,
                            "chars_out": 700000, "dropped": {"exact_duplicate": 190}},
            "decontam": {"docs_in": 800, "chars_in": 700000, "docs_out": 795, "chars_out": 695000,
                         "dropped": {"overlaps_eval": 5}},
        },
        "pii": {"email": 3},
    }  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    (path / "stats.json").write_text(json.dumps(stats))
    (path / "samples").mkdir(exist_ok=True)
    sample = {"id": 7, "source": "x", "reason": "exact_duplicate",
              "text": "def add(a, b):\n    return a + b  <dup & 'quoted'>"}  # fmt: skip
    (path / "samples" / "exact_dedup.jsonl").write_text(json.dumps(sample) + "\n")
    write_split(path, "train", CORPUS)
    write_split(path, "val", CORPUS[:3])
    _manifest(path, "data", {"documents_out": 795}, 3.2)


def write_tokenizer_and_tokens(tok: Path, tokens: Path) -> None:
    tok.mkdir(parents=True, exist_ok=True)
    stats = {"kind": "bpe", "vocab_size": 300, "val_bytes": 5000, "val_tokens": 1850,
             "bytes_per_token": 2.7, "tokens_per_word": 1.4, "unk_rate": 0.0,
             "longest_tokens": ["        return", "__init__", "print"]}  # fmt: skip
    (tok / "stats.json").write_text(json.dumps(stats))
    _manifest(tok, "tokenizer", {"vocab_size": 300}, 1.5)
    tokens.mkdir(parents=True, exist_ok=True)
    meta = {"dtype": "uint16", "vocab_size": 300, "tokenizer_hash": "abc", "eos_id": 1,
            "bos_id": 0, "counts": {"train": 120000, "val": 6000},
            "documents": {"train": 755, "val": 40}}  # fmt: skip
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
