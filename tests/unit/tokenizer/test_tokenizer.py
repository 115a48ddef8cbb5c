"""Tokenizer training, the HF layout (parity with transformers) and token shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.common.io import write_jsonl
from lmforge.config import load_config
from lmforge.errors import ConfigError, InputError
from lmforge.tokenizer import (
    EncodeConfig,
    TokenizerConfig,
    TokenizerFiles,
    encode,
    tokenizer_hash,
    train_tokenizer,
)
from lmforge.tokenizer.encode import token_dtype

WORDS = "the model reads text and learns which token follows which one in a sequence".split()


def make_corpus(root: Path, n_train: int = 300, n_val: int = 40) -> Path:
    rng = np.random.default_rng(0)

    def doc(i: int) -> dict:
        words = rng.choice(WORDS, size=int(rng.integers(5, 40)))
        return {"text": " ".join(words) + f". Item {i} costs 12.5 € — naïve café!", "id": str(i)}

    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "train.jsonl.zst", (doc(i) for i in range(n_train)))
    write_jsonl(root / "val.jsonl.zst", (doc(i) for i in range(n_train, n_train + n_val)))
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def bpe_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "bpe"
    cfg = TokenizerConfig(data=corpus, out=out, vocab_size=400)
    return train_tokenizer(cfg)


def test_bpe_writes_hf_layout_and_stats(bpe_dir: Path) -> None:
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ):
        assert (bpe_dir / name).is_file()
    stats = json.loads((bpe_dir / "stats.json").read_text())
    assert 256 + 5 < stats["vocab_size"] <= 400  # bytes + specials + merges (small corpus)
    assert stats["unk_rate"] == 0
    assert 1.5 < stats["bytes_per_token"] < 10
    assert stats["tokens_per_word"] >= 1
    assert len(stats["longest_tokens"]) == 10
    manifest = json.loads((bpe_dir / "manifest.json").read_text())
    assert manifest["metrics"]["vocab_size"] == stats["vocab_size"]


def test_transformers_autotokenizer_matches_ours(bpe_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(bpe_dir))
    ours = TokenizerFiles.load(bpe_dir)
    for text in [
        "the model reads",
        "Item 42 costs 3.14 €",
        "naïve café\n\n  indent",
        "<|im_end|> x",
    ]:
        assert hf.encode(text) == ours.encode(text)
        assert hf.decode(ours.encode(text)) == text
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a token?"},
        {"role": "assistant", "content": "A piece of text."},
    ]
    for gen in (False, True):
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert ours.render_chat(messages, add_generation_prompt=gen) == expected
    assert hf.eos_token == "<|endoftext|>" and hf.pad_token == "<|pad|>"
    assert ours.stop_ids() == sorted({ours.eos_id, ours.token_id("<|im_end|>")})


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(max_size=200))
def test_byte_level_bpe_round_trips_any_unicode(bpe_dir: Path, text: str) -> None:
    files = TokenizerFiles.load(bpe_dir)
    assert files.decode(files.encode(text)) == text


@pytest.mark.parametrize("kind", ["wordpiece", "unigram", "char"])
def test_other_kinds_train_and_encode(kind: str, corpus: Path, tmp_path: Path) -> None:
    out = train_tokenizer(
        TokenizerConfig(data=corpus, out=tmp_path / kind, kind=kind, vocab_size=300)
    )
    files = TokenizerFiles.load(out)
    ids = files.encode("the model reads text")
    assert ids and files.token_id("<|unk|>") not in ids
    decoded = files.decode(ids)
    assert decoded.replace(" ", "") == "themodelreadstext"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["kind"] == kind and stats["vocab_size"] <= 300


def test_char_tokenizer_is_one_token_per_character(corpus: Path, tmp_path: Path) -> None:
    files = TokenizerFiles.load(
        train_tokenizer(
            TokenizerConfig(data=corpus, out=tmp_path / "c", kind="char", vocab_size=200)
        )
    )
    text = "naïve café 12"
    assert len(files.encode(text)) == len(text)
    assert files.decode(files.encode(text)) == text


def test_import_existing_tokenizer(bpe_dir: Path, tmp_path: Path) -> None:
    out = train_tokenizer(
        TokenizerConfig(import_from=bpe_dir / "tokenizer.json", out=tmp_path / "imp")
    )
    assert tokenizer_hash(out) == tokenizer_hash(bpe_dir)
    assert TokenizerFiles.load(out).chat_template is not None


def test_config_needs_exactly_one_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exactly one of 'data'"):
        load_config(TokenizerConfig, values={"out": str(tmp_path)})


def test_missing_data_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="lmforge data prepare"):
        train_tokenizer(TokenizerConfig(data=tmp_path / "nope", out=tmp_path / "t"))


def test_encode_writes_documents_with_eos_and_meta(
    corpus: Path, bpe_dir: Path, tmp_path: Path
) -> None:
    out = encode(
        EncodeConfig(data=corpus, tokenizer=bpe_dir, out=tmp_path / "tokens", batch_docs=7)
    )
    meta = json.loads((out / "meta.json").read_text())
    files = TokenizerFiles.load(bpe_dir)
    assert meta["dtype"] == "uint16" and meta["tokenizer_hash"] == tokenizer_hash(bpe_dir)
    assert meta["documents"] == {"train": 300, "val": 40}
    from lmforge.common.io import read_jsonl

    expected: list[int] = []
    for row in read_jsonl(corpus / "val.jsonl.zst"):
        expected += [*files.encode(row["text"]), files.eos_id]
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    assert val.tolist() == expected
    assert meta["counts"]["val"] == len(expected)
    assert np.fromfile(out / "train.bin", dtype=np.uint16).size == meta["counts"]["train"]


def test_token_dtype_switches_at_uint16_limit() -> None:
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
