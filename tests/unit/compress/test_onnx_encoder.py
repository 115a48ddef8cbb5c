"""compress export of encoders (BERT/RoBERTa): input_ids + attention_mask (+ token_type_ids) ->
a classifier's label logits, pooled in the graph (mean-pooled head or BERT's pooler), or a bare
encoder's last_hidden_state; onnxruntime on padded batches of real texts (a sentence pair among
them) gives what eval scores text by text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.compress.stage import CompressConfig, compress
from lmforge.errors import ConfigError
from lmforge.evals.lm import EvalModel
from lmforge.model.config import preset_config
from lmforge.model.convert import MEAN_HEAD, load_pretrained, save_pretrained
from lmforge.model.generate import pad_rows
from lmforge.model.transformer import Transformer
from lmforge.tokenizer.files import TokenizerFiles, copy_tokenizer_files

pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")  # the BERT tokenizer's files

TEXTS = [("the capital is paris .", None), ("def f ( x ) : return x + 1", "alpha beta"),
         ("one", None)]  # fmt: skip


def encoder_dir(tmp_path: Path, head: str) -> tuple[Path, TokenizerFiles]:
    """A bert-micro directory: with a mean-pooled head, a pooler head ("first") or none."""
    from lmforge.finetune.heads import SequenceClassifier
    from unit.finetune.encoder_tokenizers import bert_tokenizer_dir

    tok_dir = bert_tokenizer_dir(tmp_path / "tok")
    tok = TokenizerFiles.load(tok_dir)
    torch.manual_seed(0)
    lm = Transformer(preset_config("bert-micro", vocab_size=tok.vocab_size))
    out, special = tmp_path / head, {"pad_token_id": tok.pad_id}
    if head == "none":
        save_pretrained(lm, out, extra_config=special)
    else:
        model = SequenceClassifier(lm, 3, pooling=head)
        with torch.no_grad():
            for p in model.head.parameters():
                p.normal_(std=0.5)  # logits far enough apart to tell rows apart
        labels = model.classifier_head(["a", "b", "c"])
        save_pretrained(lm, out, extra_config=special, classifier=labels)
    copy_tokenizer_files(tok_dir, out)
    return out, tok


def padded_feed(tok: TokenizerFiles, left: bool) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """TEXTS as the tokenizer wraps them ([CLS] a [SEP] b [SEP]), padded; and the mask."""
    encoded = [tok.encode_input(text, pair, max_len=64) for text, pair in TEXTS]
    ids, mask = pad_rows([e[0] for e in encoded], tok.pad_id, None, left=left)
    types, _ = pad_rows([e[1] for e in encoded], 0, None, left=left)
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {k: v.numpy() for k, v in feed.items()}, mask.bool().numpy()


@pytest.mark.parametrize("head", ["mean", "first", "none"])
def test_an_encoder_exports_to_onnx_and_matches_eval_on_padded_batches(head, tmp_path):
    from lmforge.compress.onnx_export import ort_session
    from lmforge.evals.report import write_report

    src, tok = encoder_dir(tmp_path, head)
    with pytest.raises(
        ConfigError, match=r"is a(n encoder| classifier): export to GGUF .*formats=\[onnx\]"
    ):
        compress(CompressConfig(method="export", model=src, out=tmp_path / "g"))
    values = {"method": "export", "model": src, "out": tmp_path / "x",
              "export": {"formats": ["onnx"]}}  # fmt: skip
    out = compress(CompressConfig.model_validate(values))
    report = json.loads((out / "compression.json").read_text())
    assert report["onnx"]["max_abs_diff"] < 1e-4 and report["onnx"]["weights_bytes"] > 0
    assert "tokens_per_s" not in report["onnx"]
    page = write_report(tmp_path).read_text()
    assert (
        f"ONNX (onnxruntime) {report['onnx']['weights_bytes'] / report['before']['weights_bytes']:.2f}x the size, outputs within {report['onnx']['max_abs_diff']:.1e}"
        in page
    )
    onnx = out / "onnx"
    assert (onnx / "tokenizer.json").is_file() and (onnx / "config.json").is_file()
    assert (onnx / MEAN_HEAD).is_file() == (head == "mean")
    model = EvalModel.load(src)
    session = ort_session(onnx / "model.onnx")
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask",
                                                      "token_type_ids"]  # fmt: skip
    for left in (False, True):
        feed, mask = padded_feed(tok, left)
        (got,) = session.run(None, feed)
        if head == "none":  # each row's real tokens' states, as the model gives them alone
            want = [model.model.hidden_states(torch.tensor([e[0]]), token_type_ids=torch.tensor(
                [e[1]]))[0] for e in (tok.encode_input(t, p, max_len=64) for t, p in TEXTS)]  # fmt: skip
            assert got.shape[:2] == mask.shape
            assert np.abs(got[mask] - torch.cat(want).detach().numpy()).max() < 1e-4
            continue
        want = np.asarray([model.classify(text, pair) for text, pair in TEXTS])
        assert np.abs(want[0] - want[1]).max() > 1e-3  # rows differ: each pooled over its own
        got = torch.log_softmax(torch.from_numpy(got).double(), -1).numpy()
        assert np.abs(got - want).max() < 1e-4, f"left={left}"


def test_a_wrong_encoder_graph_fails_its_check(tmp_path):
    from lmforge.compress.onnx_export import (
        EncoderGraph,
        check_encoder_onnx,
        export_encoder_onnx,
        ort_session,
    )
    from lmforge.errors import StageError

    src, tok = encoder_dir(tmp_path, "none")
    lm = load_pretrained(src)
    head = torch.nn.Linear(lm.config.n_embd, 2)
    export_encoder_onnx(EncoderGraph(lm, head, None), tmp_path / "m.onnx")
    other = torch.nn.Linear(lm.config.n_embd, 2)  # another head's weights
    with pytest.raises(StageError, match="ONNX encoder outputs differ from PyTorch"):
        check_encoder_onnx(EncoderGraph(lm, other, None), tok.pad_id,
                           ort_session(tmp_path / "m.onnx"), 1e-4)  # fmt: skip


def test_a_token_classifier_is_refused_before_the_original_is_measured(tmp_path, monkeypatch):
    from lmforge.compress import measure
    from lmforge.finetune.tagging import TokenTagger

    def measured(*_):
        raise AssertionError("measured the original before refusing it")

    monkeypatch.setattr(measure, "model_report", measured)

    src, _ = encoder_dir(tmp_path, "none")
    lm = load_pretrained(src)
    tagger = TokenTagger(lm, 2)
    save_pretrained(lm, tmp_path / "tagger", extra_config={"pad_token_id": 0},
                    classifier=tagger.classifier_head(["B-X", "O"]))  # fmt: skip
    copy_tokenizer_files(src, tmp_path / "tagger")
    values = {"method": "export", "model": tmp_path / "tagger", "out": tmp_path / "x",
              "export": {"formats": ["onnx"]}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"tagger is a token classifier: ONNX export takes"):
        compress(CompressConfig.model_validate(values))
    assert not (tmp_path / "x" / "manifest.json").exists()


def test_an_encoder_decoder_is_refused_before_an_export_crash(tmp_path):
    from lmforge.model.seq2seq import Seq2SeqLM
    from unit.finetune.helpers import make_tokenizer_dir

    tok_dir = make_tokenizer_dir(tmp_path / "tok")
    vocab = TokenizerFiles.load(tok_dir).vocab_size
    ids = {"pad_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 2}
    save_pretrained(Seq2SeqLM(preset_config("bart-micro", vocab_size=vocab)), tmp_path / "bart",
                    extra_config=ids)  # fmt: skip
    copy_tokenizer_files(tok_dir, tmp_path / "bart")
    values = {"method": "export", "model": tmp_path / "bart", "out": tmp_path / "x",
              "export": {"formats": ["onnx"]}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"bart is an encoder-decoder: export .* method=quantize"):
        compress(CompressConfig.model_validate(values))  # was a TorchExportError mid-stage
    assert not (tmp_path / "x" / "manifest.json").exists()
