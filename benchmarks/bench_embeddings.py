"""/v1/embeddings throughput: texts/s one request at a time against 16 concurrent clients.

One run, one model, one machine: builds an encoder directory (the `--preset` shape, random
weights, the tests' BERT WordPiece tokenizer), starts the real server (`lmforge serve`, through
serve/launch.py), then sends `--requests` one-text requests (texts of 4-40 words) one at a time,
and the same requests from 16 client threads, each level `--rounds` times alternately; prints
texts/s per round, the medians, and the ratio. The vectors of both levels are compared too:
the run stops if batched ones differ from one-at-a-time ones by more than 1e-5.

Run: `.venv/bin/python benchmarks/bench_embeddings.py --preset bert-tiny --requests 256`
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from lmforge.serve.launch import ServerProcess

TESTS = Path(__file__).resolve().parents[1] / "tests"


def build_encoder_dir(out: Path, preset: str) -> Path:
    """A servable encoder dir: random `preset` weights + the tests' BERT tokenizer."""
    sys.path.insert(0, str(TESTS))
    from unit.finetune.encoder_tokenizers import bert_tokenizer_dir
    from unit.finetune.helpers import make_model_dir

    tok = bert_tokenizer_dir(out / "tokenizer")
    make_model_dir(out / "model", tok, preset=preset)
    return out / "model"


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    sys.path.insert(0, str(TESTS))
    from unit.finetune.encoder_tokenizers import WORDS

    words = [w for w in WORDS if not w.startswith("##")]
    return [" ".join(rng.choices(words, k=rng.randint(4, 40))) for _ in range(n)]


def timed(url: str, batch: list[str], clients: int) -> tuple[float, np.ndarray]:
    """(texts/s, the vectors) of one-text requests from `clients` threads."""
    import httpx

    with httpx.Client(base_url=url, timeout=120) as http:

        def one(text: str) -> list[float]:
            r = http.post("/v1/embeddings", json={"model": "enc", "input": text})
            r.raise_for_status()
            return r.json()["data"][0]["embedding"]

        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            vectors = list(pool.map(one, batch))
        return len(batch) / (time.perf_counter() - start), np.array(vectors)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="bert-tiny")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_encoder_dir(Path(tmp), args.preset)
        batch = texts(args.requests)
        flags = ["--threads", str(args.threads), "--feedback-db", f"{tmp}/feedback.db"]
        with ServerProcess([f"enc={model}"], args=flags) as server:
            timed(server.url, batch[:16], 16)  # warm-up
            rates: dict[int, list[float]] = {1: [], 16: []}
            for _ in range(args.rounds):
                for clients in (1, 16):
                    rate, vectors = timed(server.url, batch, clients)
                    rates[clients].append(rate)
                    if clients == 1:
                        alone = vectors
                    else:
                        diff = float(np.abs(vectors - alone).max())
                        print(f"max |16 clients - 1 client| = {diff:.2e}")
                        if diff > 1e-5:  # a number from wrong vectors is no number
                            sys.exit(f"batched vectors differ from one-at-a-time by {diff:.2e}")
                print(f"texts/s: 1 client {rates[1][-1]:.1f}, 16 clients {rates[16][-1]:.1f}")
    one, many = statistics.median(rates[1]), statistics.median(rates[16])
    print(f"median texts/s: 1 client {one:.1f}, 16 clients {many:.1f} ({many / one:.2f}x)")


if __name__ == "__main__":
    main()
