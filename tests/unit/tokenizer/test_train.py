"""Tokenizer training and import: the HF layout, parity with transformers, stats, config errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.common.io import write_jsonl
from lmforge.config import load_config
from lmforge.errors import ConfigError, InputError
from lmforge.tokenizer import TokenizerConfig, TokenizerFiles, tokenizer_hash, train_tokenizer

HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def gpt4_bpe(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> TokenizerFiles:
    out = tmp_path_factory.mktemp("gpt4") / "tok"
    cfg = TokenizerConfig(data=corpus, out=out, vocab_size=350, pre_tokenizer="gpt4")
    return TokenizerFiles.load(train_tokenizer(cfg))


def test_bpe_writes_hf_layout_and_stats(bpe_dir: Path) -> None:
    for name in (*HF_FILES, "chat_template.jinja", "stats.json", "manifest.json"):
        assert (bpe_dir / name).is_file(), name
    stats = json.loads((bpe_dir / "stats.json").read_text())
    assert 256 + 5 < stats["vocab_size"] <= 400  # bytes + specials + merges (small corpus)
    assert stats["unk_rate"] == 0
    assert 1.5 < stats["bytes_per_token"] < 10
    assert stats["tokens_per_word"] >= 1
    assert len(stats["longest_tokens"]) == 10
    assert all(len(t) >= len(stats["longest_tokens"][-1]) for t in stats["longest_tokens"])
    config = json.loads((bpe_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["model_max_length"] == 2048 and "{% generation %}" in config["chat_template"]
    manifest = json.loads((bpe_dir / "manifest.json").read_text())
    assert manifest["metrics"]["vocab_size"] == stats["vocab_size"]
    assert manifest["metrics"]["bytes_per_token"] == stats["bytes_per_token"]


def test_special_tokens_come_first_and_are_never_split(bpe_dir: Path) -> None:
    files = TokenizerFiles.load(bpe_dir)
    specials = ["<|endoftext|>", "<|pad|>", "<|unk|>", "<|im_start|>", "<|im_end|>"]
    assert [files.token_id(t) for t in specials] == [0, 1, 2, 3, 4]
    assert files.eos_id == files.bos_id == 0 and files.pad_id == 1
    assert files.encode("a<|im_end|>b")[1] == 4
    assert files.stop_ids() == [0, 4]


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
        ids = ours.encode(text)
        assert hf.encode(text) == ids
        assert hf.decode(ids) == text == ours.decode(ids, skip_special_tokens=False)
        assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids)
    assert hf.eos_token == "<|endoftext|>" and hf.pad_token == "<|pad|>"
    assert hf.unk_token == "<|unk|>" and hf.model_max_length == 2048
    assert len(hf) == ours.vocab_size


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(max_size=200))
def test_byte_level_bpe_round_trips_any_unicode(bpe_dir: Path, text: str) -> None:
    files = TokenizerFiles.load(bpe_dir)
    assert files.decode(files.encode(text), skip_special_tokens=False) == text


@pytest.mark.parametrize("kind", ["wordpiece", "unigram", "char"])
def test_other_kinds_train_and_encode(kind: str, corpus: Path, tmp_path: Path) -> None:
    out = train_tokenizer(
        TokenizerConfig(data=corpus, out=tmp_path / kind, kind=kind, vocab_size=300)
    )
    files = TokenizerFiles.load(out)
    ids = files.encode("the model reads text")
    assert ids and files.token_id("<|unk|>") not in ids
    assert files.decode(ids).replace(" ", "") == "themodelreadstext"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["kind"] == kind and stats["vocab_size"] <= 300
    assert stats["unk_rate"] == 0  # every val character was seen in train
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    for text in ("Item 7 costs 3 €", "the model, reads: text!"):
        ids = files.encode(text)
        assert hf.encode(text) == ids
        assert hf.decode(ids, skip_special_tokens=True) == files.decode(ids)


@settings(max_examples=80, deadline=None)
@given(text=st.text(max_size=120))
def test_gpt4_split_byte_level_bpe_is_lossless_too(gpt4_bpe: TokenizerFiles, text: str) -> None:
    assert gpt4_bpe.decode(gpt4_bpe.encode(text), skip_special_tokens=False) == text


def test_unknown_characters_count_in_unk_rate(corpus: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl.zst", [{"text": "abc abc cab"}] * 5)
    write_jsonl(data / "val.jsonl.zst", [{"text": "abcxyz"}])  # x, y, z never seen
    out = train_tokenizer(TokenizerConfig(data=data, out=tmp_path / "c", kind="char"))
    stats = json.loads((out / "stats.json").read_text())
    assert stats["unk_rate"] == pytest.approx(3 / 6)


def test_char_tokenizer_is_one_token_per_character(corpus: Path, tmp_path: Path) -> None:
    files = TokenizerFiles.load(
        train_tokenizer(
            TokenizerConfig(data=corpus, out=tmp_path / "c", kind="char", vocab_size=200)
        )
    )
    text = "naïve café 12"
    assert len(files.encode(text)) == len(text)
    assert files.decode(files.encode(text)) == text


def test_normalization_digits_and_pre_tokenizer(corpus: Path, tmp_path: Path) -> None:
    cfg = TokenizerConfig(
        data=corpus,
        out=tmp_path / "n",
        vocab_size=400,
        normalization=["nfkc", "lowercase"],
        pre_tokenizer="gpt4",
    )
    files = TokenizerFiles.load(train_tokenizer(cfg))
    assert files.decode(files.encode("THE Model ﬁ")) == "the model fi"  # ﬁ ligature -> fi
    pieces = [files.tokenizer.id_to_token(i) for i in files.encode("12345")]
    assert pieces == list("12345")  # split_digits (default) wins over gpt4's groups of three
    whole = TokenizerConfig(data=corpus, out=tmp_path / "d", vocab_size=400, split_digits=False)
    assert len(TokenizerFiles.load(train_tokenizer(whole)).encode(" 12.5")) == 3  # " 12" "." "5"


def test_import_existing_tokenizer(bpe_dir: Path, corpus: Path, tmp_path: Path) -> None:
    from_file = train_tokenizer(
        TokenizerConfig(import_from=bpe_dir / "tokenizer.json", out=tmp_path / "imp")
    )
    assert tokenizer_hash(from_file) == tokenizer_hash(bpe_dir)
    assert TokenizerFiles.load(from_file).chat_template is not None
    measured = TokenizerConfig(import_from=bpe_dir, data=corpus, out=tmp_path / "imp2")
    stats = json.loads((train_tokenizer(measured) / "stats.json").read_text())
    assert stats["kind"] == "imported"  # not retrained, but measured on the val split
    assert (
        stats["bytes_per_token"]
        == json.loads((bpe_dir / "stats.json").read_text())["bytes_per_token"]
    )


def test_import_bare_tokenizer_json_gets_metadata_for_tokens_it_has(
    bpe_dir: Path, tmp_path: Path
) -> None:
    bare = tmp_path / "my-tokenizer.json"  # any file name
    bare.write_bytes((bpe_dir / "tokenizer.json").read_bytes())
    out = train_tokenizer(TokenizerConfig(import_from=bare, out=tmp_path / "o"))
    files = TokenizerFiles.load(out)
    assert files.special == TokenizerFiles.load(bpe_dir).special and files.chat_template
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf.eos_token == "<|endoftext|>" and hf.encode("café 12") == files.encode("café 12")


def test_import_bare_tokenizer_without_our_specials(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    out = train_tokenizer(TokenizerConfig(import_from=tmp_path, out=tmp_path / "o"))
    files = TokenizerFiles.load(out)
    assert files.special == {} and files.chat_template is None  # nothing invented
    assert files.encode("hello world") == [1, 2]
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"give 'data' .* or 'import_from'"):
        load_config(TokenizerConfig, values={"out": str(tmp_path)})
    with pytest.raises(ConfigError, match="pre_tokenizer 'gpt4' does not fit kind 'wordpiece'"):
        load_config(
            TokenizerConfig,
            values={"out": "o", "data": "d", "kind": "wordpiece", "pre_tokenizer": "gpt4"},
        )
    with pytest.raises(ConfigError, match="kind"):
        load_config(TokenizerConfig, values={"out": "o", "data": "d", "kind": "sentencepiece"})


def test_empty_corpus_is_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    write_jsonl(empty / "train.jsonl.zst", [])
    write_jsonl(empty / "val.jsonl.zst", [])
    with pytest.raises(InputError, match=r"no text to train a tokenizer on.*lmforge data stats"):
        train_tokenizer(TokenizerConfig(data=empty, out=tmp_path / "t"))


def test_missing_inputs_name_the_command(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="lmforge data prepare"):
        train_tokenizer(TokenizerConfig(data=tmp_path / "nope", out=tmp_path / "t"))
    with pytest.raises(InputError, match=r"no tokenizer\.json to import"):
        train_tokenizer(TokenizerConfig(import_from=tmp_path, out=tmp_path / "t2"))


def test_a_malformed_tokenizer_config_names_the_file_line_and_what_to_do(
    bpe_dir: Path, tmp_path: Path
) -> None:
    copied = tmp_path / "tok"
    shutil.copytree(bpe_dir, copied)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        good = (copied / name).read_text(encoding="utf-8")
        (copied / name).write_text(good.replace('"', "'", 2), encoding="utf-8")
        bad = re.escape(f"{copied / name} is not valid JSON (line ")
        with pytest.raises(InputError, match=f"^{bad}.*save the tokenizer again"):
            TokenizerFiles.load(copied)
        (copied / name).write_text(good, encoding="utf-8")
    assert TokenizerFiles.load(copied).special == TokenizerFiles.load(bpe_dir).special
    (copied / "tokenizer.json").write_text('{"model": ', encoding="utf-8")
    bad = re.escape(f"{copied}/tokenizer.json cannot be read (")
    with pytest.raises(InputError, match=f"^{bad}.*\\); mend it, or save the tokenizer again"):
        TokenizerFiles.load(copied)


def test_wordpiece_with_a_mask_token_for_masked_lm(corpus: Path, tmp_path: Path) -> None:
    specials = {"bos": "[CLS]", "eos": "[SEP]", "pad": "[PAD]", "unk": "[UNK]", "mask": "[MASK]"}
    cfg = TokenizerConfig(
        data=corpus, out=tmp_path / "wp", kind="wordpiece", vocab_size=300, special_tokens=specials
    )
    files = TokenizerFiles.load(train_tokenizer(cfg))
    assert files.mask_id == files.token_id("[MASK]") is not None
    assert files.encode("a [MASK] b")[1] == files.mask_id  # never split
    assert {files.mask_id, files.pad_id, files.eos_id} <= set(files.special_ids())
    assert json.loads((tmp_path / "wp" / "special_tokens_map.json").read_text())["mask_token"] == (
        "[MASK]"
    )
    transformers = pytest.importorskip("transformers")
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "wp")).mask_token == "[MASK]"


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_encoder_template_adds_cls_sep_as_transformers_does(
    kind: str, corpus: Path, tmp_path: Path
) -> None:
    specials = {"bos": "[CLS]", "eos": "[SEP]", "pad": "[PAD]", "unk": "[UNK]", "mask": "[MASK]"}
    cfg = TokenizerConfig(data=corpus, out=tmp_path / kind, kind=kind, vocab_size=300,
                          special_tokens=specials, template="encoder")  # fmt: skip
    files = TokenizerFiles.load(train_tokenizer(cfg))
    cls, sep = files.token_id("[CLS]"), files.token_id("[SEP]")
    assert files.template_ends() == ([cls], [sep])
    ids, types, _ = files.encode_input("the model reads", "which token")
    a = files.encode("the model reads")
    assert ids == [cls, *a, sep, *files.encode("which token"), sep]
    assert types == [0] * (len(a) + 2) + [1] * (len(files.encode("which token")) + 1)
    assert (
        files.encode("the model") == files.encode_input("the model")[0][1:-1]
    )  # bare: no specials
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / kind))
    want = hf("the model reads", "which token", return_token_type_ids=True)
    assert (want["input_ids"], want["token_type_ids"]) == (ids, types)
    assert (hf.cls_token, hf.sep_token) == ("[CLS]", "[SEP]")
