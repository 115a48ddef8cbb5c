"""A mean-pooled encoder classifier: finetune writes final/ as the encoder plus
mean_pooled_classifier.safetensors, the eval stage reloads it with the stage's own val metrics,
transformers' BertModel + the head file reproduce its logits, and a broken head is named."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from lmforge.errors import InputError
from lmforge.evals.lm import EvalModel
from lmforge.evals.stage import evaluate
from lmforge.finetune.heads import SEQ_LEN_KEY
from lmforge.finetune.stage import FinetuneConfig, finetune
from lmforge.model.convert import MEAN_HEAD, MEAN_HEAD_KEY

from .encoder_tokenizers import bert_tokenizer_dir
from .helpers import make_model_dir

transformers = pytest.importorskip("transformers")
WORDS = ["alpha", "beta", "gamma", "delta", "one", "two", "three", "four"]
TRAIN = {"max_steps": 10, "lr": 3e-3, "micro_batch_size": 8, "seq_len": 16, "warmup_steps": 2,
         "eval_every": 0, "eval_steps": 1, "ckpt_every": 0}  # fmt: skip


def _rows(n: int, shift: int) -> list[dict[str, str]]:
    # the label is the first word; the second word is noise
    return [{"text": f"{WORDS[i % 4]} {WORDS[(i * 3 + shift) % 8]} text", "label": WORDS[i % 4]}
            for i in range(n)]  # fmt: skip


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(finetune stage dir of a mean-pooled bert-micro classifier, its val rows)."""
    root = tmp_path_factory.mktemp("mean-pool")
    base = make_model_dir(root / "base", bert_tokenizer_dir(root / "tok"), preset="bert-micro")
    val = _rows(16, shift=1)
    values = {"model": base, "data": _write(root / "train.jsonl", _rows(48, shift=0)),
              "val_data": _write(root / "val.jsonl", val), "out": root / "out",
              "task": "classify", "pooling": "mean", "train": TRAIN}  # fmt: skip
    return finetune(FinetuneConfig.model_validate(values)), val


def test_eval_stage_reloads_it_with_the_finetune_val_metrics(trained, tmp_path):
    out, val = trained
    manifest = json.loads((out / "manifest.json").read_text())["metrics"]
    assert MEAN_HEAD in manifest["export"]
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"] and config[MEAN_HEAD_KEY] == MEAN_HEAD
    task = {"name": "val", "type": "classification", "classifier": "head", "examples": val}
    stage = evaluate({"models": [{"name": "mean", "path": out}], "tasks": [task],
                      "out": tmp_path / "eval"})  # fmt: skip
    res = json.loads((stage / "eval.json").read_text())["results"]["mean"]["val"]
    assert res["scoring"] == "head (mean_tokens)" and res["n"] == len(val)
    ours = {
        k: round(res[k], 4) for k in ("accuracy", "precision_macro", "recall_macro", "f1_macro")
    }
    theirs = {k: manifest[k] for k in ("accuracy", "precision", "recall", "macro_f1")}
    assert list(ours.values()) == list(theirs.values()), (ours, theirs)
    assert (stage / "plots" / "confusion_mean_val.png").is_file()
    errors = [json.loads(line) for line in (stage / "errors.jsonl").read_text().splitlines()]
    wrong = round((1 - manifest["accuracy"]) * len(val))
    assert len(errors) == min(5, wrong)
    assert all(e["model"] == "mean" and e["predicted"] != e["label"] for e in errors)


def test_transformers_bert_model_and_the_head_file_give_our_logits(trained):
    from safetensors import safe_open

    final = trained[0] / "final"
    texts = ["alpha one text", "delta", "gamma three four two text"]
    with safe_open(str(final / MEAN_HEAD), "pt") as f:
        weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
        labels = json.loads(f.metadata()["labels"])
    bert = transformers.BertModel.from_pretrained(final).eval()
    enc = transformers.AutoTokenizer.from_pretrained(final)(
        texts, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        h = bert(**enc).last_hidden_state  # (B, T, C)
        m = enc["attention_mask"].unsqueeze(-1).float()
        want = torch.log_softmax((h * m).sum(1) / m.sum(1) @ weight.T + bias, dim=-1)
    model = EvalModel.load(trained[0])
    assert model.head.labels == labels == sorted(WORDS[:4])
    got = np.asarray([model.classify(t) for t in texts])
    assert np.abs(got - want.numpy()).max() <= 1e-4


def test_a_missing_or_foreign_head_file_is_named(trained, tmp_path):
    from safetensors.torch import save_file

    from lmforge.compress.stage import CompressConfig, compress

    final = shutil.copytree(trained[0] / "final", tmp_path / "run" / "final")
    (final / MEAN_HEAD).unlink()
    task = {"name": "val", "type": "classification", "examples": trained[1]}
    with pytest.raises(InputError, match=rf"{MEAN_HEAD}, which is missing; rerun the finetune"):
        evaluate({"models": [tmp_path / "run"], "tasks": [task], "out": tmp_path / "eval"})
    with pytest.raises(InputError, match=rf"{MEAN_HEAD}, which is missing; rerun the finetune"):
        compress(CompressConfig(method="quantize", model=tmp_path / "run", out=tmp_path / "q"))
    assert not (tmp_path / "q" / "final").exists()
    # the layout an older lmforge wrote: the whole classifier's state beside no final/
    old = tmp_path / "old"
    old.mkdir()
    save_file({"head.weight": torch.zeros(2, 4), "lm.wte.weight": torch.zeros(9, 4)},
              str(old / MEAN_HEAD), metadata={"labels": '["a", "b"]', "pooling": "mean"})  # fmt: skip
    with pytest.raises(InputError, match=rf"{MEAN_HEAD} is a mean-pooled classifier without"):
        EvalModel.load(old)
    shutil.copy(old / MEAN_HEAD, final / MEAN_HEAD)
    with pytest.raises(InputError, match=r"found tensors \['head.weight', 'lm.wte.weight'\]"):
        _ = EvalModel.load(final).head
    save_file({"weight": torch.zeros(3, 4), "bias": torch.zeros(3)}, str(final / MEAN_HEAD),
              metadata={"labels": '["a", "b"]'})  # fmt: skip
    with pytest.raises(InputError, match=r"weight \(3, 4\) and bias \(3,\) do not fit its 2"):
        _ = EvalModel.load(final).head
    save_file({"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}, str(final / MEAN_HEAD),
              metadata={"labels": '["a", "b"]'})  # fmt: skip
    with pytest.raises(InputError, match=r"reads 4-wide states, .* hidden_size\) makes 64"):
        _ = EvalModel.load(final).head


def _head_file(model_dir):
    """A mean-pooled head file's metadata and tensors, comparable with == (its bytes are not: the
    header's metadata order varies from one write to the next)."""
    from safetensors import safe_open

    with safe_open(str(model_dir / MEAN_HEAD), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k).tolist() for k in sorted(f.keys())}


def test_compress_quantize_and_prune_keep_the_head_next_token_methods_refuse(trained, tmp_path):
    from lmforge.compress.stage import CompressConfig, compress
    from lmforge.errors import ConfigError

    out = trained[0]
    texts = ["alpha one text", "delta", "gamma three four two text"]
    want = np.asarray([EvalModel.load(out).classify(t) for t in texts])
    head = _head_file(out / "final")
    source = json.loads((out / "final" / "config.json").read_text())
    width, seq_len = source["intermediate_size"], source[SEQ_LEN_KEY]
    data = _write(tmp_path / "val.jsonl", trained[1])
    for method, settings in (("quantize", {}), ("prune", {"kind": "neurons", "sparsity": 0.25})):
        values = {"method": method, "model": out, "out": tmp_path / method, method: settings}
        final = compress(CompressConfig.model_validate(values | {"data": data})) / "final"
        report = json.loads((final.parent / "compression.json").read_text())
        assert "tokens_per_s" not in report["after"] and report["after"]["pseudo_perplexity"] > 1
        config = json.loads((final / "config.json").read_text())
        assert config[MEAN_HEAD_KEY] == MEAN_HEAD and _head_file(final) == head
        assert config[SEQ_LEN_KEY] == seq_len  # eval cuts texts where the source's fine-tune did
        model = EvalModel.load(final)
        assert (model.head.reads, model.head.labels) == ("mean_tokens", sorted(WORDS[:4]))
        got = np.asarray([model.classify(t) for t in texts])
        if method == "quantize":  # int8 rows: the classifier barely moves
            assert "quantization_config" in config and np.abs(got - want).max() <= 0.01
        else:  # a quarter of the MLP units gone, the head still reads n_embd-wide states
            assert config["intermediate_size"] == width * 3 // 4 and np.isfinite(got).all()
    refused = {"distill": "use method=quantize", "prune": "recover it on labelled examples"}
    for method, says in refused.items():
        values = {"method": method, "model": out, "out": tmp_path / "refused", "tokens": tmp_path}
        with pytest.raises(ConfigError, match=rf"is a classifier: {method}.*; {says}"):
            compress(CompressConfig.model_validate(values))
    with pytest.raises(ConfigError, match=r"is a classifier: export to GGUF"):  # ONNX: it exports
        compress(CompressConfig(method="export", model=out, out=tmp_path / "refused"))


@pytest.mark.parametrize("pooling", ["first", "mean"])
def test_eval_stops_where_training_does_at_a_text_ending_in_pad_tokens(pooling, tmp_path):
    # no template ([CLS] ... [SEP]) ends the text, so its own trailing pad-id tokens are the end
    from lmforge.finetune.heads import SequenceClassifier, encode_texts
    from lmforge.model.config import preset_config
    from lmforge.model.convert import save_pretrained
    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer.files import TokenizerFiles, copy_tokenizer_files

    from .helpers import make_tokenizer_dir

    tok_dir = make_tokenizer_dir(tmp_path / "tok")
    tok = TokenizerFiles.load(tok_dir)
    texts = ["The capital is Paris.<|pad|><|pad|>", "The capital is Paris."]
    assert tok.encode(texts[0])[-2:] == [tok.pad_id] * 2
    torch.manual_seed(0)
    model = SequenceClassifier(Transformer(preset_config("bert-micro", vocab_size=tok.vocab_size)),
                               2, pooling).eval()  # fmt: skip
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_(std=0.5)
    head, special = model.classifier_head(["a", "b"]), {"pad_token_id": tok.pad_id}
    save_pretrained(model.lm, tmp_path / "m", extra_config=special, classifier=head)
    copy_tokenizer_files(tok_dir, tmp_path / "m")
    rows, _ = encode_texts(tok, texts, [0, 0], 32, template=True)
    with torch.no_grad():
        batch = {k: torch.from_numpy(v) for k, v in rows.items()}
        want = model(batch["input_ids"], batch["last"], batch["token_type_ids"])[0]
    got = torch.tensor(
        [EvalModel.load(tmp_path / "m").classify(t) for t in texts], dtype=torch.float64
    )
    assert torch.allclose(got, want.log_softmax(-1).double(), atol=1e-5)
    assert torch.allclose(got[0], got[1], atol=1e-6)  # the trailing pads are not attended


def test_finetune_and_eval_macro_averages_differ_by_a_class_absent_from_both():
    # finetune's val metrics average over the classes in the truth or the predictions
    # (scikit-learn's default); eval's over every label of the head (scikit-learn's labels=):
    # a class neither present nor predicted counts 0 in eval only, so the README's "equal" needs
    # every label among the rows or predictions
    from lmforge.evals.metrics import classification_metrics as eval_metrics
    from lmforge.finetune.heads import classification_metrics as finetune_metrics

    y_true, y_pred, labels = [0, 0, 1, 1], [0, 1, 1, 1], ["a", "b", "c"]
    tuned = finetune_metrics(y_true, y_pred, n_classes=3)
    names = [[labels[i] for i in ys] for ys in (y_true, y_pred)]
    for head_labels, scale in ((labels, 3 / 2), (labels[:2], 1)):
        scored = eval_metrics(*names, head_labels)
        pairs = (
            ("precision", "precision_macro"),
            ("recall", "recall_macro"),
            ("macro_f1", "f1_macro"),
        )
        assert [tuned[a] for a, _ in pairs] == [round(scored[b] * scale, 4) for _, b in pairs]
    assert tuned["macro_f1"] == 0.7333 and tuned["accuracy"] == scored["accuracy"] == 0.75


def test_a_new_classifier_starts_from_a_base_head_only_when_it_pools_the_same(trained):
    from lmforge.finetune.fit import _start_from_base_head
    from lmforge.finetune.heads import SequenceClassifier
    from lmforge.model.convert import load_classifier, load_pretrained

    final, labels = trained[0] / "final", sorted(WORDS[:4])
    base = load_classifier(final)
    for pooling in ("mean", "first"):
        model = SequenceClassifier(load_pretrained(final), len(labels), pooling)
        fresh = model.head.weight.detach().clone()
        _start_from_base_head(model, final, labels)
        started = torch.equal(model.head.weight, base.weight)
        assert started == (pooling == "mean") and started != torch.equal(model.head.weight, fresh)


def test_save_pretrained_writes_a_mean_pooled_classifier_as_encoder_and_head_file(tmp_path):
    from safetensors import safe_open

    from lmforge.finetune.heads import SequenceClassifier
    from lmforge.model.config import preset_config
    from lmforge.model.convert import load_classifier, save_pretrained
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    model = SequenceClassifier(Transformer(preset_config("bert-micro", vocab_size=64)), 3, "mean")
    head = model.classifier_head(["x", "y", "z"])
    save_pretrained(model.lm, tmp_path / "m", extra_config={"pad_token_id": 0}, classifier=head)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config[MEAN_HEAD_KEY] == MEAN_HEAD and "id2label" not in config
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        names = f.keys()
    assert not [k for k in names if k.startswith("classifier")]  # the encoder alone
    got = load_classifier(tmp_path / "m")
    assert (got.pooling, got.labels) == ("mean", ["x", "y", "z"])
    assert torch.equal(got.weight, head.weight) and torch.equal(got.bias, head.bias)
    assert [p.name for p in (tmp_path / "m").iterdir() if p.name.startswith(".")] == []
