"""Data pipeline benchmark: lmforge vs datatrove end to end, and fuzzy dedup vs datasketch.

One run prints documents/s side by side and the ratios (targets: >= 2x datatrove, >= 5x
datasketch) plus recall of planted near-duplicates. Not a timed test; results go to
docs/benchmarks.md. Needs the bench extra: pip install 'lmforge[bench]' (datatrove, datasketch).

    python benchmarks/bench_data.py --docs 4000 --workers 2
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


# ---------------------------------------------------------------- corpus with planted duplicates
def sentence_pool() -> list[str]:
    """Prose sentences from the Python docs topics (real English present on every machine)."""
    from pydoc_data.topics import topics

    text = " ".join(topics.values())
    sents = re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text))
    return [
        s for s in sents if 8 <= len(s.split()) <= 30 and re.fullmatch(r"[A-Za-z ,;'()-]+\.", s)
    ]


def make_corpus(n_docs: int, seed: int = 0) -> tuple[list[str], dict[int, int], int]:
    """n_docs documents: ~80% unique, 10% exact copies, 10% near-duplicates (2 words changed).

    Returns (texts, {near-dup index: original index}, number of exact copies).
    """
    rng = random.Random(seed)
    pool = sentence_pool()
    n_unique = int(n_docs * 0.8)
    docs = ["\n\n".join(" ".join(rng.sample(pool, 4)) for _ in range(3)) for _ in range(n_unique)]
    near: dict[int, int] = {}
    n_exact = 0
    while len(docs) < n_docs:
        src = rng.randrange(n_unique)
        if len(docs) % 2:
            docs.append(docs[src])
            n_exact += 1
        else:
            words = docs[src].split(" ")
            for _ in range(2):
                words[rng.randrange(len(words))] = rng.choice(
                    ["river", "engine", "window", "garden"]
                )
            near[len(docs)] = src
            docs.append(" ".join(words))
    return docs, near, n_exact


def shingles(text: str, n: int = 5) -> list[bytes]:
    words = re.findall(r"\w+", text.lower())
    return [" ".join(g).encode() for g in zip(*(words[i:] for i in range(n)), strict=False)]


def normalized_bytes(doc) -> bytes:
    """datatrove exact-dedup key: the same normalization lmforge uses (lowercase words)."""
    return " ".join(re.findall(r"\w+", doc.text.lower())).encode()


# ------------------------------------------------------------------------- end to end: lmforge
def run_lmforge(input_path: Path, work: Path, workers: int) -> tuple[float, int]:
    from lmforge.common.logging import setup_logging
    from lmforge.data import prepare

    setup_logging(quiet=True)
    cfg = {
        "source": [str(input_path)],
        "out": str(work / "lmforge"),
        "workers": workers,
        "batch_size": 128,
        "language": {"enabled": False},
        "pii": {"enabled": False},
        "clean": {"nfkc": False, "strip_tags": False},
        "dedup": {"num_perm": 112, "bands": 14, "rows": 8, "threshold": 0.7},
    }
    t0 = time.perf_counter()
    out = prepare(cfg, force=True)
    elapsed = time.perf_counter() - t0
    return elapsed, json.loads((out / "stats.json").read_text())["documents_out"]


# ----------------------------------------------------------------------- end to end: datatrove
def run_datatrove(input_path: Path, work: Path, workers: int) -> tuple[float, int]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from datatrove.pipeline.formatters import FTFYFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Simple(WordTokenizer):
        """Whitespace words and regex sentences (datatrove's English default needs spaCy)."""

        def word_tokenize(self, text):
            return text.split()

        def sent_tokenize(self, text):
            return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]

        def span_tokenize(self, text):
            return [m.span() for m in re.finditer(r"\S+", text)]

    import xxhash
    from datatrove.utils.hashes import xxhash as dt_xxhash

    # datatrove 0.10 passes str to xxhash, which current xxhash rejects; encode like it expects.
    dt_xxhash.xxhash32 = lambda data: xxhash.xxh32_intdigest(
        data.encode() if isinstance(data, str) else data
    )
    dt_xxhash.xxhash64 = lambda data: xxhash.xxh64_intdigest(
        data.encode() if isinstance(data, str) else data
    )
    tok = Simple("en")
    d = work / "datatrove"
    exact_cfg = ExactDedupConfig(content_getter=normalized_bytes)
    mh_cfg = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
    tasks = workers

    def ex(steps, n_tasks=tasks, name="s"):
        return LocalPipelineExecutor(
            steps,
            tasks=n_tasks,
            workers=workers,
            logging_dir=str(d / "logs" / name),
            skip_completed=False,
        )

    stages = [
        ex(
            [
                JsonlReader(str(input_path.parent), glob_pattern=input_path.name),
                FTFYFormatter(),
                GopherQualityFilter(language=tok),
                GopherRepetitionFilter(language=tok),
                C4QualityFilter(language=tok, filter_no_terminal_punct=True),
                FineWebQualityFilter(language=tok),
                JsonlWriter(str(d / "filtered")),
                ExactDedupSignature(str(d / "ex_sigs"), exact_cfg),
            ],
            name="1",
        ),
        ex(
            [ExactFindDedups(str(d / "ex_sigs"), str(d / "ex_dups"), exact_cfg)],
            n_tasks=1,
            name="2",
        ),
        ex(
            [
                JsonlReader(str(d / "filtered")),
                ExactDedupFilter(str(d / "ex_dups"), exact_cfg),
                JsonlWriter(str(d / "exact")),
                MinhashDedupSignature(str(d / "mh_sigs"), config=mh_cfg, language=tok),
            ],
            name="3",
        ),
        ex(
            [MinhashDedupBuckets(str(d / "mh_sigs"), str(d / "mh_buckets"), config=mh_cfg)],
            n_tasks=mh_cfg.num_buckets,
            name="4",
        ),
        ex(
            [MinhashDedupCluster(str(d / "mh_buckets"), str(d / "mh_ids"), config=mh_cfg)],
            n_tasks=1,
            name="5",
        ),
        ex(
            [
                JsonlReader(str(d / "exact")),
                MinhashDedupFilter(str(d / "mh_ids")),
                JsonlWriter(str(d / "final")),
            ],
            name="6",
        ),
    ]
    t0 = time.perf_counter()
    for stage in stages:
        stage.run()
    elapsed = time.perf_counter() - t0
    kept = sum(
        1 for f in (d / "final").glob("*.jsonl.gz") for _ in __import__("gzip").open(f, "rt")
    )
    return elapsed, kept


# ------------------------------------------------------------------------ fuzzy dedup alone
def fuzzy_lmforge(docs: list[str]) -> tuple[float, np.ndarray]:
    from lmforge.data.minhash import MinHasher, cluster_duplicates

    t0 = time.perf_counter()
    hasher = MinHasher(num_perm=128, ngram=5, seed=1)
    sigs = np.concatenate([hasher.signatures(docs[i : i + 256]) for i in range(0, len(docs), 256)])
    roots = cluster_duplicates(sigs, bands=16, rows=8, threshold=0.7)
    return time.perf_counter() - t0, roots != np.arange(len(docs))


def fuzzy_datasketch(docs: list[str]) -> tuple[float, np.ndarray]:
    from datasketch import MinHash, MinHashLSH

    t0 = time.perf_counter()
    lsh = MinHashLSH(threshold=0.7, num_perm=128)
    dup = np.zeros(len(docs), dtype=bool)
    for i, text in enumerate(docs):
        m = MinHash(num_perm=128, seed=1)
        m.update_batch(shingles(text))
        if lsh.query(m):
            dup[i] = True
        else:
            lsh.insert(str(i), m)
    return time.perf_counter() - t0, dup


def quiet_datatrove() -> None:
    from loguru import logger

    logger.remove()  # datatrove logs every step's stats to stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    quiet_datatrove()
    docs, near, n_exact = make_corpus(args.docs)
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        src = work / "input" / "corpus.jsonl"
        src.parent.mkdir(parents=True)
        src.write_text(
            "".join(json.dumps({"text": t, "id": str(i)}) + "\n" for i, t in enumerate(docs))
        )
        print(
            f"corpus: {len(docs)} docs, {sum(map(len, docs)) / 1e6:.1f} MB, {n_exact} exact copies, {len(near)} planted near-duplicates"
        )

        t_lf, kept_lf = run_lmforge(src, work, args.workers)
        t_dt, kept_dt = run_datatrove(src, work, args.workers)
        print(f"end to end  lmforge   {len(docs) / t_lf:8.0f} docs/s ({t_lf:.1f}s, kept {kept_lf})")
        print(f"end to end  datatrove {len(docs) / t_dt:8.0f} docs/s ({t_dt:.1f}s, kept {kept_dt})")
        print(f"ratio end to end: {t_dt / t_lf:.2f}x (target >= 2x)")

        t_ours, dup_ours = fuzzy_lmforge(docs)
        t_ds, dup_ds = fuzzy_datasketch(docs)
        planted = np.array(sorted(near))
        print(
            f"fuzzy dedup lmforge    {len(docs) / t_ours:8.0f} docs/s, recall of planted near-dups {dup_ours[planted].mean():.3f}"
        )
        print(
            f"fuzzy dedup datasketch {len(docs) / t_ds:8.0f} docs/s, recall of planted near-dups {dup_ds[planted].mean():.3f}"
        )
        print(f"ratio fuzzy dedup: {t_ds / t_ours:.2f}x (target >= 5x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
