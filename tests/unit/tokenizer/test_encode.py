"""The tokens stage: shards equal encode(doc) + eos per document, deterministic across workers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.common.io import read_jsonl, write_jsonl
from lmforge.errors import InputError
from lmforge.tokenizer import EncodeConfig, TokenizerFiles, encode, tokenizer_hash
from lmforge.tokenizer.encode import token_dtype

from .conftest import make_corpus


def expected_ids(path: Path, files: TokenizerFiles) -> list[int]:
    ids: list[int] = []
    for row in read_jsonl(path):
        ids += [*files.encode(row["text"]), files.eos_id]
    return ids


def test_encode_writes_documents_with_eos_and_meta(
    corpus: Path, bpe_dir: Path, tmp_path: Path
) -> None:
    out = encode(EncodeConfig(data=corpus, tokenizer=bpe_dir, out=tmp_path / "tokens"))
    meta = json.loads((out / "meta.json").read_text())
    files = TokenizerFiles.load(bpe_dir)
    assert meta["dtype"] == "uint16" and meta["tokenizer_hash"] == tokenizer_hash(bpe_dir)
    assert meta["vocab_size"] == files.vocab_size and meta["eos_id"] == files.eos_id == 0
    assert meta["documents"] == {"train": 300, "val": 40}
    for split in ("train", "val"):
        shard = np.fromfile(out / f"{split}.bin", dtype=np.uint16)
        assert shard.tolist() == expected_ids(corpus / f"{split}.jsonl.zst", files)
        assert meta["counts"][split] == shard.size
        assert int((shard == files.eos_id).sum()) == meta["documents"][split]
    assert not (out / "test.bin").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["train_tokens"] == meta["counts"]["train"]


def test_worker_processes_give_identical_shards(bpe_dir: Path, tmp_path: Path) -> None:
    data = make_corpus(tmp_path / "data", n_train=120, n_val=10, n_test=25)
    one = encode(EncodeConfig(data=data, tokenizer=bpe_dir, out=tmp_path / "a", workers=1))
    # batch_docs=7: 18 train batches through 2 spawned processes, reassembled in order
    two = encode(
        EncodeConfig(data=data, tokenizer=bpe_dir, out=tmp_path / "b", workers=2, batch_docs=7)
    )
    for split in ("train", "val", "test"):
        assert (one / f"{split}.bin").read_bytes() == (two / f"{split}.bin").read_bytes()
    meta = json.loads((two / "meta.json").read_text())
    assert meta["documents"] == {"train": 120, "val": 10, "test": 25}


def test_documents_spelling_special_tokens_stay_text(bpe_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    text = "before <|endoftext|> after <|im_start|>"
    write_jsonl(data / "train.jsonl.zst", [{"text": text}])
    write_jsonl(data / "val.jsonl.zst", [{"text": "x"}])
    out = encode(EncodeConfig(data=data, tokenizer=bpe_dir, out=tmp_path / "t"))
    ids = np.fromfile(out / "train.bin", dtype=np.uint16).tolist()
    files = TokenizerFiles.load(bpe_dir)
    assert ids[-1] == files.eos_id and files.eos_id not in ids[:-1]
    assert files.token_id("<|im_start|>") not in ids
    assert files.decode(ids[:-1]) == text


def test_bad_record_names_file_and_line(bpe_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl.zst", [{"text": "ok"}, {"body": "no text"}])
    write_jsonl(data / "val.jsonl.zst", [{"text": "x"}])
    with pytest.raises(InputError, match=r"train\.jsonl\.zst line 2: expected .* string 'text'"):
        encode(EncodeConfig(data=data, tokenizer=bpe_dir, out=tmp_path / "t"))


def test_missing_inputs_name_the_command(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="lmforge tokenizer train"):
        encode(EncodeConfig(data=corpus, tokenizer=tmp_path / "none", out=tmp_path / "t"))
    with pytest.raises(InputError, match="lmforge data prepare"):
        encode(EncodeConfig(data=tmp_path / "none", tokenizer=tmp_path, out=tmp_path / "t"))


def test_token_dtype_switches_at_uint16_limit() -> None:
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_tokenizer_without_eos_is_a_clear_error(corpus: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")).save(
        str(tok_dir / "tokenizer.json")
    )
    with pytest.raises(InputError, match="defines no eos_token"):
        encode(EncodeConfig(data=corpus, tokenizer=tok_dir, out=tmp_path / "t"))
