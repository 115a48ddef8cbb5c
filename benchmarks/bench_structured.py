"""What structured outputs cost per decoding step: the token masker over a 4,096- and a 50,257-token
byte-level BPE vocabulary.

Both vocabularies are trained here (tokenizers' BPE trainer, GPT-2's byte-level layout) on the
Python standard library's source, so nothing is downloaded; 50,257 is GPT-2's size. For each
constraint (a JSON schema, json_object, a regex, a choice) a seeded random walk draws an allowed
token at every step, as a model would under the mask, and times the mask (a trie walk on a new
guide state, a dict lookup on a state seen before) and the guide's advance. Then the engine-side
step for a batch of 8 guided rows (serve/guided_rows.py: masks gathered, logits masked).

    .venv/bin/python benchmarks/bench_structured.py [--steps 200] [--corpus-mb 20] [--warm-seconds 0]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from lmforge.constrain import GuideCompiler, compiler_for

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "kind": {"enum": ["a", "b", "c"]},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}
SPECS = {
    "json_schema": json.dumps(SCHEMA),
    "json_object": "",
    "regex": r"[A-Z][a-z]{2,12}( [A-Z][a-z]{2,12})*, \d{1,3} (years|days)\.",
    "choice": json.dumps(["positive", "negative", "neutral", "mixed feelings"]),
}


def corpus(megabytes: float) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, size = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        text = path.read_text(encoding="utf-8", errors="ignore")
        texts.append(text)
        size += len(text)
        if size > megabytes * 1e6:
            break
    return texts


def train_bpe(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    return tok


def walk(
    compiler: GuideCompiler, kind: str, steps: int, seed: int = 0, warm_seconds: float = 0.0
) -> dict[str, float]:
    """A seeded random walk under the mask; restarts when the answer is complete. warm_seconds:
    the compile first warms the guide's masks (what the server does, GUIDE_WARM_SECONDS)."""
    t0 = time.perf_counter()
    guide = compiler.compile(kind, SPECS[kind], warm_seconds).tokens
    compile_s = time.perf_counter() - t0
    rng = random.Random(seed)
    state = guide.start
    miss, hit, adv = [], [], []
    for _ in range(steps):
        cached = guide.has_mask(state)
        t0 = time.perf_counter()
        mask = guide.allowed(state)
        dt = time.perf_counter() - t0
        (hit if cached else miss).append(dt)
        ids = mask.nonzero().flatten().tolist()
        if not ids:  # complete: a new answer
            state = guide.start
            continue
        t0 = time.perf_counter()
        state = guide.advance(state, rng.choice(ids))
        adv.append(time.perf_counter() - t0)
    mean = lambda xs: 1e3 * sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return dict(compile_ms=1e3 * compile_s, misses=len(miss), miss_ms=mean(miss),
                hits=len(hit), hit_ms=mean(hit), step_ms=mean(miss + hit), advance_ms=mean(adv))  # fmt: skip


def batch_step(compiler: GuideCompiler, rows: int = 8, repeats: int = 50) -> float:
    """ms for guided_logits on `rows` guided rows whose masks are cached (B, V) float logits."""
    from lmforge.serve.guided_rows import guided_logits
    from lmforge.serve.request_book import Row
    from lmforge.serve.sampling import SamplingParams

    guide = compiler.compile("json_object", "")
    batch = [Row(None, [1], SamplingParams(guide=guide), frozenset({0})) for _ in range(rows)]
    logits = torch.randn(rows, compiler.vocab.size)
    guided_logits(batch, logits, logits)
    t0 = time.perf_counter()
    for _ in range(repeats):
        guided_logits(batch, logits, logits)
    return 1e3 * (time.perf_counter() - t0) / repeats


def engine_steps(tok, guided: bool, tmp: Path, requests: int = 8, tokens: int = 48) -> list[float]:
    """ms per decoding step of an Engine running `requests` seeded requests at once, twice:
    the second batch finds the guide's masks cached by the first."""
    from lmforge.model.config import preset_config
    from lmforge.model.convert import save_pretrained
    from lmforge.model.transformer import Transformer
    from lmforge.serve.engine import Engine, SamplingParams, collect

    model_dir = tmp / f"m{tok.get_vocab_size()}"
    if not model_dir.exists():
        torch.manual_seed(0)
        model = Transformer(preset_config("micro", vocab_size=tok.get_vocab_size(), init_std=0.2))
        save_pretrained(model.eval(), model_dir)
        tok.save(str(model_dir / "tokenizer.json"))
        config = {"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}
        (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    engine = Engine.from_dir(model_dir, device="cpu", max_batch_size=requests, threads=1)
    engine.start()
    guide = (
        compiler_for(engine.files).compile("json_schema", SPECS["json_schema"]) if guided else None
    )
    prompt = engine.files.encode("Fill in the record:")
    out = []
    for batch in range(2):
        steps = engine.stats().steps
        t0 = time.perf_counter()
        handles = [
            engine.submit(
                prompt,
                SamplingParams(max_tokens=tokens, seed=i, ignore_eos=True, guide=guide),
                f"r{batch}-{i}",
            )
            for i in range(requests)
        ]
        for h in handles:
            collect(h)
        out.append(1e3 * (time.perf_counter() - t0) / max(engine.stats().steps - steps, 1))
    engine.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--corpus-mb", type=float, default=20.0)
    ap.add_argument("--warm-seconds", type=float, default=0.0, help="warm each guide first")
    args = ap.parse_args()
    torch.set_num_threads(1)
    texts = corpus(args.corpus_mb)
    for size in (4096, 50257):
        t0 = time.perf_counter()
        tok = train_bpe(texts, size)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        compiler = GuideCompiler(tok)
        print(f"vocab {tok.get_vocab_size()}: BPE trained in {train_s:.1f}s; token bytes + trie "
              f"{time.perf_counter() - t0:.2f}s")  # fmt: skip
        for kind in SPECS:
            r = walk(compiler, kind, args.steps, warm_seconds=args.warm_seconds)
            print(f"  {kind:12s} compile {r['compile_ms']:7.1f} ms | {r['misses']:3d} new states "
                  f"{r['miss_ms']:7.2f} ms | {r['hits']:3d} seen {r['hit_ms']:.4f} ms | mean "
                  f"{r['step_ms']:6.2f} ms/step | advance {r['advance_ms']:.4f} ms")  # fmt: skip
        print(f"  guided_logits, 8 rows, cached masks: {batch_step(compiler):.3f} ms/step")
        with tempfile.TemporaryDirectory() as tmp:
            plain, guided = (engine_steps(tok, g, Path(tmp)) for g in (False, True))
        print(f"  engine, 8 requests, micro model, ms/step (first batch, second): free "
              f"{plain[0]:.2f}, {plain[1]:.2f}; json_schema guide {guided[0]:.2f}, {guided[1]:.2f}")  # fmt: skip
        sys.stdout.flush()


if __name__ == "__main__":
    main()
