"""Encoder inputs as transformers makes them: the tokenizer's [CLS]/[SEP] (<s>/</s>) template,
sentence pairs with token types, and the classifier's logits end to end (tokenizer included)."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.finetune import heads, tagging
from lmforge.model.config import preset_config
from lmforge.model.convert import save_pretrained
from lmforge.model.transformer import Transformer
from lmforge.tokenizer.files import TokenizerFiles, copy_tokenizer_files

from .encoder_tokenizers import bert_tokenizer_dir, roberta_tokenizer_dir

transformers = pytest.importorskip("transformers")
TEXTS = ["The capital is Paris.", "x y", "def f(x): return x + 1 and more words here", ""]
PAIRS = ["the capital", "def f(x): return x + 1", "x", "more words"]
FAMILIES = {"bert": (bert_tokenizer_dir, 0), "roberta": (roberta_tokenizer_dir, 2)}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    make_dir, offset = FAMILIES[request.param]
    return request.param, make_dir(tmp_path_factory.mktemp(request.param)), offset


def test_encoded_ids_equal_transformers_tokenizer(family):
    _, tok_dir, _ = family
    hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
    ours = TokenizerFiles.load(tok_dir)
    for text, pair in [*zip(TEXTS, [None] * 4, strict=True), *zip(TEXTS, PAIRS, strict=True)]:
        for max_len in (None, 8):
            want = hf(text, pair, truncation=max_len is not None, max_length=max_len,
                      return_token_type_ids=True)  # fmt: skip
            ids, types, cut = ours.encode_input(text, pair, max_len=max_len)
            assert ids == want["input_ids"] and types == want["token_type_ids"], (text, pair)
            assert cut == (len(ours.encode_input(text, pair)[0]) > len(ids))
    rows, truncated = heads.encode_texts(ours, TEXTS, [0] * 4, 8, pairs=PAIRS, template=True)
    want = hf(TEXTS, PAIRS, truncation=True, max_length=8, padding="max_length")
    assert rows["input_ids"].tolist() == want["input_ids"] and truncated == 3
    # the classifier pools the real tokens: the last one is the closing [SEP] / </s>
    assert [r[n] for r, n in zip(want["input_ids"], rows["last"], strict=True)] == [
        ours.template_ends()[1][0]
    ] * 4


def test_truncation_equals_the_tokenizers_library_at_every_length(family):
    _, tok_dir, _ = family
    ours = TokenizerFiles.load(tok_dir)
    ref = TokenizerFiles.load(tok_dir).tokenizer  # a private copy the reference may reconfigure
    words = "the capital is paris and more words here".split()
    for a, b in itertools.product(range(9), range(-1, 9)):
        text, pair = " ".join(words[:a]), None if b < 0 else " ".join(words[:b])
        specials = ref.num_special_tokens_to_add(pair is not None)
        for max_len in range(specials, 20):
            ref.enable_truncation(max_len, strategy="longest_first")
            want = ref.encode(text, pair, add_special_tokens=True)
            got = ours.encode_input(text, pair, max_len=max_len)
            assert got == (want.ids, want.type_ids, bool(want.overflowing)), (text, pair, max_len)
        with pytest.raises(ConfigError, match=f"no room for .* {specials} special tokens"):
            ours.encode_input(text, pair, max_len=specials - 1)


class _NoReconfiguring:
    """A tokenizer that fails if anyone toggles its (shared) truncation setting."""

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        if name in ("enable_truncation", "no_truncation", "enable_padding", "no_padding"):
            raise AssertionError(f"{name} on the shared tokenizer")
        return getattr(self._tok, name)


def test_encode_input_is_stateless_and_safe_under_threads(family):
    _, tok_dir, _ = family
    files = TokenizerFiles.load(tok_dir)
    shared = TokenizerFiles(files.path, _NoReconfiguring(files.tokenizer), None, files.special)
    jobs = [(t, p, n) for t in TEXTS for p in (None, *PAIRS) for n in (None, 4, 6, 9)]
    jobs += [(t, "encode", None) for t in TEXTS]  # plain encode() must never see a truncation

    def run(job):
        text, pair, max_len = job
        if pair == "encode":
            return shared.encode(text)
        return shared.encode_input(text, pair, max_len=max_len)

    want = [run(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(20):
            assert list(pool.map(run, jobs)) == want

    import tempfile
    from pathlib import Path

    tok_dir = bert_tokenizer_dir(Path(tempfile.mkdtemp()) / "bert")
    hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
    words = ["The", "capital", "is", "Paris", "."]
    rows, cut = tagging.encode_tagged(
        TokenizerFiles.load(tok_dir), [{"tokens": words, "tags": ["O"] * 5}], {"O": 0}, 12
    )
    want = hf(words, is_split_into_words=True)
    n = len(want["input_ids"])
    assert rows["input_ids"][0, :n].tolist() == want["input_ids"] and cut == 0
    # tags on the words' first pieces only, never on [CLS] / [SEP]
    first = {want.word_ids().index(w) for w in range(5)}
    assert {i for i, t in enumerate(rows["tag_labels"][0]) if t >= 0} == first
    assert rows["last"][0] == n - 1


def test_classifier_logits_equal_transformers_end_to_end_with_pairs(family, tmp_path):
    name, tok_dir, offset = family
    tok = TokenizerFiles.load(tok_dir)
    torch.manual_seed(0)
    lm = Transformer(preset_config("bert-micro", vocab_size=tok.vocab_size, pos_offset=offset))
    model = heads.SequenceClassifier(lm, 3).eval()
    with torch.no_grad():
        for p in (*model.head.parameters(), *model.pool.parameters(), lm.type_emb.weight):
            p.normal_(std=0.5)
    save_pretrained(lm, tmp_path, extra_config={"pad_token_id": tok.pad_id},
                    classifier=model.classifier_head(["a", "b", "c"]))  # fmt: skip
    copy_tokenizer_files(tok_dir, tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    for pairs in (None, PAIRS):
        rows, _ = heads.encode_texts(tok, TEXTS, [0] * 4, 32, pairs=pairs, template=True)
        batch = {k: torch.from_numpy(v) for k, v in rows.items()}
        with torch.no_grad():
            ours = model(batch["input_ids"], batch["last"], batch["token_type_ids"])[0]
            theirs = hf(**hf_tok(TEXTS, pairs, padding=True, return_tensors="pt")).logits
        assert (ours - theirs).abs().max().item() <= 1e-4, (name, pairs)
    # transformers' pipeline (its own tokenizer call, its own model) gives our probabilities
    pipe = transformers.pipeline("text-classification", model=str(tmp_path), top_k=None)
    scores = {d["label"]: d["score"] for d in pipe({"text": TEXTS[0], "text_pair": PAIRS[0]})}
    want = torch.softmax(ours[0], -1).tolist()
    assert [scores[k] for k in "abc"] == pytest.approx(want, abs=1e-5)
    if name == "bert":  # the second segment's type embedding matters: pairs are really typed
        types = batch["token_type_ids"]
        with torch.no_grad():
            untyped = model(batch["input_ids"], batch["last"], torch.zeros_like(types))[0]
        assert (untyped - ours).abs().max().item() > 1e-3
