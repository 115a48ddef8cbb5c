"""Sentence-pair classifiers: the eval stage scores {text, text_pair} rows as finetune encoded
them (an encoder: [CLS] text [SEP] pair [SEP] with token type 1 on the pair; a decoder: the two
texts joined), so its metrics equal the finetune stage's val metrics on the same rows."""

from __future__ import annotations

import json

import pytest

from lmforge.errors import ConfigError, InputError
from lmforge.evals.lm import EvalModel
from lmforge.evals.stage import evaluate
from lmforge.finetune.stage import FinetuneConfig, finetune

from .encoder_tokenizers import bert_tokenizer_dir
from .helpers import make_model_dir, make_tokenizer_dir

WORDS = ["alpha", "beta", "gamma", "delta", "one", "two", "three", "four"]
# seq_len holds every row whole (test_classify_input_len.py: longer ones, cut alike)
TRAIN = {"max_steps": 10, "lr": 3e-3, "micro_batch_size": 8, "seq_len": 32, "warmup_steps": 2,
         "eval_every": 0, "eval_steps": 1, "ckpt_every": 0}  # fmt: skip


def _rows(n: int, shift: int) -> list[dict[str, str]]:
    # the label is the pair's first word; the text is noise
    return [{"text": f"{WORDS[(i * 3 + shift) % 8]} text", "text_pair": f"{WORDS[i % 4]} pair",
             "label": WORDS[i % 4]} for i in range(n)]  # fmt: skip


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=["bert-micro", "micro"])
def trained(request, tmp_path_factory):
    """(finetune stage dir of a pair classifier on an encoder or a decoder, its val rows)."""
    root = tmp_path_factory.mktemp(request.param)
    tok = bert_tokenizer_dir if request.param == "bert-micro" else make_tokenizer_dir
    base = make_model_dir(root / "base", tok(root / "tok"), preset=request.param)
    val = _rows(16, shift=1)
    values = {"model": base, "data": _write(root / "train.jsonl", _rows(48, shift=0)),
              "val_data": _write(root / "val.jsonl", val), "out": root / "out",
              "task": "classify", "train": TRAIN}  # fmt: skip
    return finetune(FinetuneConfig.model_validate(values)), val


def test_eval_scores_pairs_with_the_finetune_val_metrics(trained, tmp_path):
    out, val = trained
    manifest = json.loads((out / "manifest.json").read_text())["metrics"]
    task = {"name": "val", "type": "classification", "classifier": "head", "examples": val}
    stage = evaluate({"models": [{"name": "pair", "path": out}], "tasks": [task],
                      "out": tmp_path / "eval"})  # fmt: skip
    res = json.loads((stage / "eval.json").read_text())["results"]["pair"]["val"]
    assert res["n"] == len(val)
    ours = [round(res[k], 4) for k in ("accuracy", "precision_macro", "recall_macro", "f1_macro")]
    theirs = [manifest[k] for k in ("accuracy", "precision", "recall", "macro_f1")]
    assert ours == theirs
    # the pair's second text moves the scores: scoring the first text alone differs
    model = EvalModel.load(out)
    row = val[0]
    assert model.classify(row["text"], row["text_pair"]) != model.classify(row["text"])


def test_label_likelihood_refuses_a_pair_its_prompt_does_not_read(trained, tmp_path):
    out, val = trained
    task = {"name": "val", "type": "classification", "classifier": "likelihood", "examples": val}
    with pytest.raises(ConfigError, match=r"text_pair, which label likelihood would not read"):
        evaluate({"models": [out], "tasks": [task], "out": tmp_path / "eval"})


@pytest.mark.parametrize("trained", ["micro"], indirect=True)  # an encoder's head has no LM
def test_label_likelihood_scores_a_pair_a_template_reads_with_a_format_spec(trained, tmp_path):
    out, val = trained
    template = "Text: {text}\nPair: {text_pair!s:.40}\nLabel:"
    task = {"name": "val", "type": "classification", "classifier": "likelihood",
            "examples": val, "prompt_template": template}  # fmt: skip
    stage = evaluate({"models": [{"name": "pair", "path": out}], "tasks": [task],
                      "out": tmp_path / "eval"})  # fmt: skip
    res = json.loads((stage / "eval.json").read_text())["results"]["pair"]["val"]
    assert res["n"] == len(val) and res["scoring"] == "causal"  # the labels' likelihood


def test_a_non_string_text_pair_is_refused_by_one_rule_in_finetune_and_eval(tmp_path):
    from lmforge.evals.task_format import TaskSpec, load_examples
    from lmforge.finetune.formats import read_file

    rows = [
        {"text": "a", "text_pair": None, "label": "x"},
        {"text": "b", "text_pair": 3, "label": "y"},
    ]
    bad = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(InputError, match=r"bad\.jsonl line 2: text_pair must be a string") as tuned:
        read_file(bad)
    spec = TaskSpec(name="pairs", type="classification", data=bad)
    with pytest.raises(InputError, match=r"bad\.jsonl record 2: text_pair must be a string") as ev:
        load_examples(spec)  # eval used to score str(3) = "3" as the pair
    assert "got int 3; quote it" in str(ev.value)
    assert str(tuned.value).split(": ", 1)[1] == str(ev.value).split(": ", 1)[1]  # one message
    good = _write(tmp_path / "good.jsonl", rows[:1])  # null: a single text, in both
    assert read_file(good)[1] == [{"text": "a", "label": "x"}]
    assert load_examples(TaskSpec(name="one", type="classification", data=good)) == rows[:1]
