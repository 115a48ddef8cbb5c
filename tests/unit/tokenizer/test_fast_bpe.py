"""tiktoken stands in for HF tokenizers only where it gives the same ids, and the stage checks it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.common.io import open_text, write_jsonl
from lmforge.errors import InputError
from lmforge.tokenizer import EncodeConfig, TokenizerConfig, encode, encode_worker, train_tokenizer
from lmforge.tokenizer.fast_bpe import NotExact, tiktoken_encoding

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<|unk|>", "<|"]
# (pre_tokenizer, split_digits): every bpe configuration that fast_bpe accepts
CONFIGS = [("gpt2", True), ("gpt2", False), ("gpt4", True), ("gpt4", False)]


@pytest.fixture(scope="module")
def encoders(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """{config: (HF batch encoder, tiktoken batch encoder)} for BPEs trained on `corpus`."""
    root = tmp_path_factory.mktemp("fast_bpe")
    pairs = {}
    for pre, digits in CONFIGS:
        tok = train_tokenizer(
            TokenizerConfig(
                data=corpus,
                out=root / f"{pre}-{digits}",
                vocab_size=400,
                pre_tokenizer=pre,
                split_digits=digits,
            )
        )
        path = str(tok / "tokenizer.json")
        pairs[pre, digits] = (
            encode_worker.load_encoder(path, "hf", None),
            encode_worker.load_encoder(path, "tiktoken", 1),
        )
    return pairs


def assert_same_ids(encoders: dict, text: str) -> None:
    for config, (hf, fast) in encoders.items():
        assert fast([text]) == hf([text]), (config, text)


pieces = st.one_of(
    st.sampled_from(
        [" ", "  ", "   ", "\t", "\n", "\r\n", "\n\n", " \n ", "\u00a0", "\u3000", "\u2028"]
    ),
    st.sampled_from(SPECIALS),
    st.sampled_from(["'s", "'S", "'ll", "'T", "n't", "ſ", "K", "İ"]),  # contractions, case folds
    st.text("0123456789٠١٢٣½²³Ⅻ", min_size=1, max_size=6),  # digits and other numbers
    st.text("abcxyzéÅß", min_size=1, max_size=8),
    st.text("\u0301\u0308\u0327\u200d\u200b\ufe0f", min_size=1, max_size=3),  # marks, joiners
    st.text("汉字語かなカナ한국어", min_size=1, max_size=6),
    st.text("\u05e9\u05dc\u05d5\u05dd\u0645\u0631\u062d\u0628\u0627\u200f", min_size=1, max_size=6),
    st.text("🙂👍🏽👨‍👩‍👧🇫🇷", min_size=1, max_size=4),
    st.text(".,;:!?-_()[]{}<>|/\\\"'`~@#$%^&*+=", min_size=1, max_size=5),
    st.builds(lambda c, n: c * n, st.sampled_from("ab 1\n.é"), st.integers(50, 3000)),
)
mixed = st.lists(pieces, max_size=30).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_same_ids_as_hf_on_any_unicode_text(encoders: dict, text: str) -> None:
    assert_same_ids(encoders, text)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mixed)
def test_same_ids_as_hf_on_mixed_scripts_digits_spaces_and_specials(
    encoders: dict, text: str
) -> None:
    assert_same_ids(encoders, text)


def _spec(bpe_dir: Path) -> dict:
    return json.loads((bpe_dir / "tokenizer.json").read_text())


def _swap_last_two_merge_ids(spec: dict) -> None:
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    a, b = ("".join(m) if isinstance(m, list) else m.replace(" ", "") for m in merges[-2:])
    vocab[a], vocab[b] = vocab[b], vocab[a]


def _drop_a_byte(spec: dict) -> None:
    del spec["model"]["vocab"]["Ā"]  # byte 0 (merges never use it on this corpus)


MUTATIONS = {
    "normalizer": lambda s: s.update(normalizer={"type": "NFC"}),
    "byte_fallback": lambda s: s["model"].update(byte_fallback=True),
    "dropout": lambda s: s["model"].update(dropout=0.1),
    "continuing_subword_prefix": lambda s: s["model"].update(continuing_subword_prefix="##"),
    "ignore_merges": lambda s: s["model"].update(ignore_merges=True),
    "add_prefix_space": lambda s: s["pre_tokenizer"]["pretokenizers"][1].update(
        add_prefix_space=True
    ),
    "other split": lambda s: s["pre_tokenizer"]["pretokenizers"].__setitem__(
        1, {"type": "Whitespace"}
    ),
    "truncation": lambda s: s.update(
        truncation={"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    ),
    "non-special added token": lambda s: s["added_tokens"][-1].update(special=False),
    "ids out of merge order": _swap_last_two_merge_ids,
    "missing byte": _drop_a_byte,
}


def test_our_bpe_is_accepted(bpe_dir: Path) -> None:
    enc = tiktoken_encoding(bpe_dir / "tokenizer.json")
    assert enc.encode_ordinary("<|endoftext|>") != [0]  # special tokens stay text


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_anything_but_lmforge_bpe_is_refused(bpe_dir: Path, name: str) -> None:
    spec = _spec(bpe_dir)
    MUTATIONS[name](spec)
    with pytest.raises(NotExact):
        tiktoken_encoding(spec)


@pytest.mark.parametrize("kind", ["wordpiece", "unigram", "char"])
def test_other_kinds_are_refused(corpus: Path, tmp_path: Path, kind: str) -> None:
    tok = train_tokenizer(TokenizerConfig(data=corpus, out=tmp_path / kind, kind=kind))
    with pytest.raises(NotExact, match="not BPE"):
        tiktoken_encoding(tok / "tokenizer.json")


def test_imported_gpt2_style_tokenizer_is_refused(corpus: Path, tmp_path: Path) -> None:
    from tiny_tokenizers import train_byte_bpe

    texts = ["the model reads text", "and learns 12 tokens"] * 50
    tok = train_byte_bpe(texts, 300, ["<|endoftext|>"], add_prefix_space=True)
    tok.save(str(tmp_path / "gpt2.json"))
    out = train_tokenizer(
        TokenizerConfig(import_from=tmp_path / "gpt2.json", data=corpus, out=tmp_path / "tok")
    )
    with pytest.raises(NotExact, match="pre-tokenizer"):
        tiktoken_encoding(out / "tokenizer.json")


# ----------------------------------------------------------------------------- the stage

TRICKY_DOCS = [
    "before <|endoftext|> after <|im_start|>user\nhi<|im_end|>",
    "a  1 \t2\n\n 3   x 12345 naïve 汉字 🙂👍🏽 \u0645\u0631\u062d\u0628\u0627 it's",
    "    indented\n\n\n\tcode(x**2)  # done  ",
]


def tricky_corpus(root: Path, n: int = 60) -> Path:
    root.mkdir()
    rows = [{"text": f"{TRICKY_DOCS[i % 3]} doc {i}"} for i in range(n)]
    write_jsonl(root / "train.jsonl.zst", rows)
    write_jsonl(root / "val.jsonl.zst", rows[:5])
    return root


def _encoder_used(out: Path) -> str:
    return json.loads((out / "manifest.json").read_text())["metrics"]["encoder"]


def test_stage_shards_equal_the_hf_path_byte_for_byte(bpe_dir: Path, tmp_path: Path) -> None:
    data = tricky_corpus(tmp_path / "data")
    hf = encode(EncodeConfig(data=data, tokenizer=bpe_dir, out=tmp_path / "hf", encoder="hf"))
    fast = encode(EncodeConfig(data=data, tokenizer=bpe_dir, out=tmp_path / "fast"))
    procs = encode(
        EncodeConfig(data=data, tokenizer=bpe_dir, out=tmp_path / "procs", workers=2, batch_docs=7)
    )
    assert _encoder_used(hf) == "hf"
    assert _encoder_used(fast) == _encoder_used(procs) == "tiktoken"
    for split in ("train", "val"):
        want = (hf / f"{split}.bin").read_bytes()
        assert (fast / f"{split}.bin").read_bytes() == want
        assert (procs / f"{split}.bin").read_bytes() == want
    assert (fast / "meta.json").read_bytes() == (hf / "meta.json").read_bytes()


def test_sample_check_falls_back_to_hf_and_says_where(
    bpe_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    data = tricky_corpus(tmp_path / "data")
    load = encode_worker.load_encoder

    def corrupting(path: str, encoder: str, threads: int | None) -> encode_worker.BatchEncode:
        batch = load(path, encoder, threads)
        if encoder == "hf":
            return batch

        def corrupt(texts: list[str]) -> list[list[int]]:
            ids = batch(texts)
            ids[3][1] += 1  # the 4th document of a batch, second token
            return ids

        return corrupt

    monkeypatch.setattr(encode_worker, "load_encoder", corrupting)
    with caplog.at_level(logging.WARNING, logger="lmforge.tokenizer.encode"):
        out = encode(EncodeConfig(data=data, tokenizer=bpe_dir, out=tmp_path / "t"))
    assert _encoder_used(out) == "hf"
    assert "differ on train.jsonl.zst line 4 (from token 1" in caplog.text
    monkeypatch.undo()
    hf = encode(EncodeConfig(data=data, tokenizer=bpe_dir, out=tmp_path / "hf", encoder="hf"))
    assert (out / "train.bin").read_bytes() == (hf / "train.bin").read_bytes()


def test_other_tokenizers_stay_on_hf(corpus: Path, tmp_path: Path) -> None:
    tok = train_tokenizer(TokenizerConfig(data=corpus, out=tmp_path / "wp", kind="wordpiece"))
    out = encode(EncodeConfig(data=corpus, tokenizer=tok, out=tmp_path / "t"))
    assert _encoder_used(out) == "hf"


@pytest.mark.parametrize("encoder", ["auto", "hf"])
def test_lone_surrogate_is_an_input_error_on_both_paths(
    bpe_dir: Path, tmp_path: Path, encoder: str
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with open_text(data / "train.jsonl.zst", "wt") as fh:
        fh.write('{"text": "fine"}\n{"text": "half \\ud800 pair"}\n')
    write_jsonl(data / "val.jsonl.zst", [{"text": "x"}])
    with pytest.raises(InputError, match=r"train\.jsonl\.zst line 2: .*lone surrogate"):
        encode(EncodeConfig(data=data, tokenizer=bpe_dir, out=tmp_path / "t", encoder=encoder))
