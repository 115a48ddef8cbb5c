"""generation_config.json: derived from the tokenizer's chat template, read back as transformers does."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from lmforge.errors import InputError
from lmforge.tokenizer import TokenizerFiles
from lmforge.tokenizer.generation import (
    GENERATION_CONFIG,
    eos_ids,
    generation_config,
    load_generation_config,
)


def model_dir_without_generation_config(bpe_dir: Path, path: Path, **config: int) -> Path:
    """Tokenizer files + a config.json with the given special ids (a pre-issue-19 export)."""
    shutil.copytree(bpe_dir, path, ignore=shutil.ignore_patterns("manifest.json", "stats.json"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    return path


def test_lists_the_document_end_and_the_chat_turn_end(bpe_dir: Path) -> None:
    files = TokenizerFiles.load(bpe_dir)
    assert generation_config(files) == {
        "eos_token_id": [0, 4],
        "bos_token_id": 0,
        "pad_token_id": 1,
    }
    assert files.encode("<|im_end|>") == [4]


def test_keeps_what_it_inherits_and_adds_the_template_stops(bpe_dir: Path) -> None:
    files = TokenizerFiles.load(bpe_dir)
    base = {"eos_token_id": 9, "pad_token_id": 2, "temperature": 0.7, "do_sample": True}
    assert generation_config(files, base) == {
        "eos_token_id": [9, 0, 4], "pad_token_id": 2, "temperature": 0.7, "do_sample": True,
        "bos_token_id": 0,
    }  # fmt: skip
    assert generation_config(files, generation_config(files)) == generation_config(files)


def test_transformers_reads_the_file_as_written(bpe_dir: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    written = generation_config(TokenizerFiles.load(bpe_dir))
    (tmp_path / GENERATION_CONFIG).write_text(json.dumps(written))
    theirs = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert theirs.eos_token_id == [0, 4] and theirs.pad_token_id == 1 and theirs.bos_token_id == 0
    assert load_generation_config(tmp_path) == written


def test_a_directory_without_the_file_gets_what_lmforge_would_write(
    bpe_dir: Path, tmp_path: Path
) -> None:
    model_dir = model_dir_without_generation_config(bpe_dir, tmp_path / "m", eos_token_id=3)
    gen = load_generation_config(model_dir)
    assert gen == {"eos_token_id": [3, 0, 4], "bos_token_id": 0, "pad_token_id": 1}
    # the file, when there is one, is the whole truth (as in transformers)
    (model_dir / GENERATION_CONFIG).write_text(json.dumps({"eos_token_id": 0}))
    assert eos_ids(load_generation_config(model_dir)) == [0]


@pytest.mark.parametrize("text", ['{"eos_token_id": "<|im_end|>"}', '{"eos_token_id": [0, true]}'])
def test_a_malformed_file_is_one_line_naming_it(tmp_path: Path, text: str) -> None:
    (tmp_path / GENERATION_CONFIG).write_text(text)
    with pytest.raises(
        InputError, match=re.escape(f"{tmp_path / GENERATION_CONFIG}: eos_token_id must be")
    ):
        load_generation_config(tmp_path)
    (tmp_path / GENERATION_CONFIG).write_text("{not json")
    with pytest.raises(InputError, match=r"generation_config\.json is not valid JSON"):
        load_generation_config(tmp_path)
