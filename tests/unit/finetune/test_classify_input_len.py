"""A classifier reads a long text as its fine-tune did: finetune records the train.seq_len its
rows were cut at in final/config.json, and eval (and compress, which carries the key) cuts there
too, so a text longer than seq_len gets the same logits in eval as in finetune's val metrics (and
a tagger's eval scores the words its val metrics scored)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmforge.config import validate
from lmforge.errors import ConfigError, InputError
from lmforge.evals.lm import EvalModel
from lmforge.finetune.heads import SEQ_LEN_KEY, SequenceClassifier, encode_texts
from lmforge.finetune.stage import FinetuneConfig, finetune

from .encoder_tokenizers import bert_tokenizer_dir
from .helpers import make_model_dir, make_tokenizer_dir

WORDS = ["alpha", "beta", "gamma", "delta", "one", "two", "three", "four"]
SEQ_LEN = 8
TRAIN = {"max_steps": 6, "lr": 3e-3, "micro_batch_size": 8, "seq_len": SEQ_LEN,
         "warmup_steps": 1, "eval_every": 0, "eval_steps": 1, "ckpt_every": 0}  # fmt: skip


def _rows(n: int) -> list[dict[str, str]]:
    # the label is the first word; the tail runs far past seq_len and differs row to row
    tail = lambda i: " ".join(WORDS[(i + j) % 8] for j in range(12))  # noqa: E731
    return [{"text": f"{WORDS[i % 2]} {tail(i)}", "label": WORDS[i % 2]} for i in range(n)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize(("preset", "pooling"), [("micro", "first"), ("bert-micro", "mean")])
def test_a_text_longer_than_seq_len_scores_the_same_in_eval_and_finetune(preset, pooling, tmp_path):
    tok_dir = (bert_tokenizer_dir if preset == "bert-micro" else make_tokenizer_dir)(tmp_path / "t")
    base = make_model_dir(tmp_path / "base", tok_dir, preset=preset)
    rows = _rows(16)
    values = {"model": base, "data": _write(tmp_path / "train.jsonl", rows), "out": tmp_path / "o",
              "task": "classify", "pooling": pooling, "train": TRAIN}  # fmt: skip
    out = finetune(FinetuneConfig.model_validate(values))
    assert json.loads((out / "final" / "config.json").read_text())[SEQ_LEN_KEY] == SEQ_LEN
    model = EvalModel.load(out)
    assert model.head.max_len == SEQ_LEN < model.block_size
    texts = [r["text"] for r in rows[:4]]
    assert all(len(model.encode(t)) > SEQ_LEN for t in texts)
    # finetune's rows and forward (what its val metrics predict from), with the trained weights
    clf = SequenceClassifier(model.model, 2, pooling=pooling).eval()
    clf.head.load_state_dict(model.head.linear.state_dict())
    encoder = preset == "bert-micro"
    enc, cut = encode_texts(model.files, texts, [0] * 4, SEQ_LEN, template=encoder)
    assert cut == 4
    types = torch.from_numpy(enc["token_type_ids"]) if encoder else None
    with torch.no_grad():
        tuned = clf(torch.from_numpy(enc["input_ids"]), torch.from_numpy(enc["last"]), types)[0]
    want = torch.log_softmax(tuned.double(), -1).numpy()
    got = np.asarray([model.classify(t) for t in texts])
    assert np.abs(got - want).max() < 1e-5
    model.head.max_len = model.block_size  # what eval read before: the whole text
    whole = np.asarray([model.classify(t) for t in texts])
    assert np.abs(whole - want).max() > 1e-4  # so the cut is what makes them agree


def test_a_recorded_seq_len_beyond_the_block_size_is_refused(tmp_path):
    tok_dir = make_tokenizer_dir(tmp_path / "t")
    base = make_model_dir(tmp_path / "base", tok_dir, preset="micro")
    values = {"model": base, "data": _write(tmp_path / "train.jsonl", _rows(16)), "out": tmp_path / "o",
              "task": "classify", "train": TRAIN | {"max_steps": 1}}  # fmt: skip
    final = finetune(FinetuneConfig.model_validate(values)) / "final"
    config = json.loads((final / "config.json").read_text())
    (final / "config.json").write_text(json.dumps(config | {SEQ_LEN_KEY: 10**6}))
    with pytest.raises(InputError, match=rf"config.json: {SEQ_LEN_KEY}=1000000 is not a length"):
        _ = EvalModel.load(final).head


@pytest.mark.parametrize("task", ["classify", "multitask", "tag", "seq2seq"])
def test_a_truncation_policy_is_refused_where_rows_are_cut_at_their_start(task, tmp_path):
    base = {"model": str(tmp_path), "data": str(tmp_path / "d.jsonl"), "out": str(tmp_path / "o")}
    for policy in ("left", "drop"):  # was ignored: rows kept their start whatever it said
        with pytest.raises(ConfigError, match=rf"sft\.truncation={policy} applies to --task sft"):
            validate(FinetuneConfig, {**base, "task": task, "sft": {"truncation": policy}})
        assert validate(FinetuneConfig, {**base, "sft": {"truncation": policy}}).task == "sft"
    assert validate(FinetuneConfig, {**base, "task": task, "sft": {"truncation": "right"}})


def test_eval_tags_the_words_a_token_classifier_was_fine_tuned_on(tokenizer_dir, tmp_path):
    from lmforge.evals.heads import load_token_head
    from lmforge.evals.tagging import run_tagging
    from lmforge.evals.task_format import TaskSpec
    from lmforge.finetune.tagging import TokenTagger, encode_tagged, predict_tags
    from lmforge.model.convert import save_pretrained
    from lmforge.tokenizer.files import copy_tokenizer_files

    tags = ["B-X", "O"]
    src = make_model_dir(tmp_path / "base", tokenizer_dir, preset="bert-micro")
    tagger = TokenTagger(EvalModel.load(src).model, len(tags))
    final = tmp_path / "final"  # as finetune --task tag exports it, train.seq_len recorded
    save_pretrained(tagger.lm, final, extra_config={SEQ_LEN_KEY: SEQ_LEN},
                    classifier=tagger.classifier_head(tags))  # fmt: skip
    copy_tokenizer_files(tokenizer_dir, final)
    rows = [{"tokens": WORDS[i:] + WORDS[:i], "tags": ["B-X"] + ["O"] * 7} for i in range(3)]
    model = EvalModel.load(final)
    result = run_tagging(model, TaskSpec(name="t", type="tagging", examples=rows), None)
    index = {t: i for i, t in enumerate(tags)}
    encoded, cut = encode_tagged(model.files, rows, index, SEQ_LEN)  # finetune's val rows
    assert result.metrics["truncated"] == cut == len(rows)  # eval read the block size before
    want = [[tags[t] for t in row] for row in predict_tags(load_token_head(model)[0], encoded)]
    assert [r["predicted"] for r in result.records] == want


@pytest.mark.parametrize("preset", ["micro", "bert-micro"])
def test_transformers_truncation_cuts_where_eval_does(preset, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok_dir = (bert_tokenizer_dir if preset == "bert-micro" else make_tokenizer_dir)(tmp_path / "t")
    base = make_model_dir(tmp_path / "base", tok_dir, preset=preset)
    values = {"model": base, "data": _write(tmp_path / "train.jsonl", _rows(16)), "out": tmp_path / "o",
              "task": "classify", "train": TRAIN | {"max_steps": 2}}  # fmt: skip
    final = finetune(FinetuneConfig.model_validate(values)) / "final"
    text = _rows(1)[0]["text"]
    tok = transformers.AutoTokenizer.from_pretrained(final)
    assert tok.model_max_length == SEQ_LEN  # was unset: truncation=True cut nothing
    inputs = tok(text, truncation=True, return_tensors="pt")
    assert inputs["input_ids"].shape == (1, SEQ_LEN) and len(tok(text)["input_ids"]) > SEQ_LEN
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(final).eval()
    with torch.no_grad():
        logits = torch.log_softmax(hf(**inputs).logits[0].double(), -1).numpy()
    assert np.abs(np.asarray(EvalModel.load(final).classify(text)) - logits).max() < 1e-4
