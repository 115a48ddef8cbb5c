"""`lmforge pretrain` end to end on a tiny tokenizer and shards built in the test."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.train.pretrain import tokenizer_hash

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "red",
    "birds",
    "sing",
    "in",
    "old",
    "green",
    "trees",
]


def make_tokenizer(out: Path) -> Path:
    """A byte-level BPE tokenizer (vocab ~300) with <|eos|>, trained on synthetic sentences."""
    from tiny_tokenizers import train_byte_bpe

    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=12)) for _ in range(300)]
    tok = train_byte_bpe(texts, 300, ["<|eos|>"])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "eos_token": "<|eos|>",
        "bos_token": "<|eos|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def make_shards(root: Path, n_docs: int = 400) -> tuple[Path, Path]:
    """(tokens_dir, tokenizer_dir): train.bin/val.bin of a simple repetitive language + meta.json."""
    from tokenizers import Tokenizer

    tok_dir = make_tokenizer(root / "tokenizer")
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    eos = tok.token_to_id("<|eos|>")
    rng = np.random.default_rng(1)
    out = root / "tokens"
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, n in (("train", n_docs), ("val", n_docs // 8)):
        ids: list[int] = []
        for _ in range(n):
            start = int(rng.integers(0, len(WORDS)))
            text = " ".join(
                WORDS[(start + i) % len(WORDS)] for i in range(int(rng.integers(5, 20)))
            )
            ids += [*tok.encode(text).ids, eos]
        np.asarray(ids, dtype=np.uint16).tofile(out / f"{split}.bin")
        counts[f"{split}_tokens"] = len(ids)
    meta = {
        "dtype": "uint16",
        "vocab_size": tok.get_vocab_size(),
        "tokenizer_hash": tokenizer_hash(tok_dir),
        **counts,
    }
    (out / "meta.json").write_text(json.dumps(meta))
    return out, tok_dir


def lmforge(*args: str, check: bool = True, quiet: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lmforge.cli", *(["--quiet"] if quiet else []), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


SMALL = [
    "--preset", "micro",
    "--set", "train.max_steps=40", "--set", "train.seq_len=32", "--set", "train.micro_batch_size=8",
    "--set", "train.eval_every=20", "--set", "train.eval_steps=4", "--set", "train.ckpt_every=20",
    "--set", "train.warmup_steps=5", "--set", "train.lr=3e-3", "--set", "train.device=cpu",
]  # fmt: skip


@pytest.mark.integration
def test_pretrain_writes_a_complete_hf_model_and_learns(tmp_path):
    tokens, tok_dir = make_shards(tmp_path)
    out = tmp_path / "pretrain"
    lmforge(
        "pretrain", "--tokens", str(tokens), "--tokenizer", str(tok_dir), "--out", str(out), *SMALL
    )

    manifest = json.loads((out / "manifest.json").read_text())
    metrics = manifest["metrics"]
    vocab = json.loads((tokens / "meta.json").read_text())["vocab_size"]
    assert metrics["steps"] == 40 and metrics["tokens_seen"] == 40 * 8 * 32
    assert metrics["val_loss"] < math.log(vocab) - 1.5  # well below uniform: it learned
    assert metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_loss"]), rel=1e-3)
    assert metrics["params"] > 0 and metrics["tokens_per_s"] > 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / "final" / name).is_file(), name
    assert (out / "loss.png").stat().st_size > 1000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [20, 40]
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_20", "step_40"]
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["vocab_size"] == vocab and config["eos_token_id"] == 0
    # no chat template: generation stops at the document end only; pad falls back to eos
    generation = json.loads((out / "final" / "generation_config.json").read_text())
    assert generation == {"eos_token_id": [0], "bos_token_id": 0, "pad_token_id": 0}

    # the exported directory loads in transformers with the same logits as our model
    transformers = pytest.importorskip("transformers")
    from lmforge.model.convert import load_pretrained

    ours = load_pretrained(out / "final")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "final").eval()
    ids = torch.from_numpy(np.fromfile(tokens / "val.bin", dtype=np.uint16)[:32].astype(np.int64))[
        None
    ]
    with torch.no_grad():
        assert torch.allclose(ours(ids), hf(ids).logits, atol=1e-4)
    assert hf.generation_config.eos_token_id == [0] and hf.generation_config.pad_token_id == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(out / "final")
    assert hf_tok.decode(hf_tok("the lazy dog").input_ids) == "the lazy dog"

    # same config and inputs: cached
    again = lmforge(
        "pretrain", "--tokens", str(tokens), "--tokenizer", str(tok_dir), "--out", str(out), *SMALL
    )
    assert "cached" in again.stderr or json.loads((out / "manifest.json").read_text()) == manifest


@pytest.mark.integration
def test_shards_from_another_tokenizer_are_refused(tmp_path):
    tokens, tok_dir = make_shards(tmp_path, n_docs=40)
    meta = json.loads((tokens / "meta.json").read_text())
    (tokens / "meta.json").write_text(json.dumps({**meta, "tokenizer_hash": "deadbeef"}))
    proc = lmforge("pretrain", "--tokens", str(tokens), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "p"),
                   *SMALL, check=False, quiet=False)  # fmt: skip
    assert proc.returncode == 2
    assert "tokenizer hash deadbeef" in proc.stderr and "re-encode" in proc.stderr
