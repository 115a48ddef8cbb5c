"""compress export: ONNX with a KV cache against PyTorch (onnxruntime), GGUF read back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.compress.gguf_export import (
    check_gguf,
    export_gguf,
    gguf_arch,
    rope_permute,
    tokenizer_metadata,
)
from lmforge.compress.onnx_export import (
    check_classifier_onnx,
    check_onnx,
    empty_past,
    export_onnx,
    ort_session,
    run_step,
)
from lmforge.compress.stage import CompressConfig, compress
from lmforge.errors import ConfigError, StageError
from lmforge.model.config import preset_config
from lmforge.model.convert import load_pretrained
from lmforge.model.generate import generate, pad_rows
from lmforge.model.transformer import Transformer, apply_rotary


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Transformer, Path]:
    """A micro model (GQA: 4 query heads, 2 kv heads) and its ONNX export."""
    torch.manual_seed(0)
    model = Transformer(preset_config("micro")).eval()
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(model, path)
    return model, path


def test_onnx_matches_pytorch_on_padded_prefill_and_cached_decode(onnx_model) -> None:
    model, path = onnx_model
    diffs = check_onnx(model, ort_session(path), atol=1e-4)
    assert diffs["prefill_max_abs_diff"] < 1e-4 and diffs["decode_max_abs_diff"] < 1e-4


def test_onnx_greedy_decoding_reproduces_pytorch_generate(onnx_model) -> None:
    model, path = onnx_model
    session = ort_session(path)
    prompt = torch.tensor([[5, 17, 42, 9]])
    want = generate(model, prompt, 8, greedy=True)[0, 4:].tolist()
    ids, mask, past, got = prompt, torch.ones_like(prompt), empty_past(model, 1), []
    for _ in range(8):
        logits, keys, values = run_step(session, ids, mask, past)
        ids = torch.from_numpy(logits[:, -1].argmax(-1, keepdims=True))
        got.append(int(ids))
        mask, past = torch.ones((1, mask.size(1) + 1), dtype=torch.long), (keys, values)
    assert got == want
    assert keys.shape == (2, 1, 2, 4 + 7, model.config.hd)  # (n_layer, B, n_kv, P + T, hd)


def test_gpt2_style_onnx_export_matches_too(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Transformer(preset_config("micro-gpt2")).eval()  # learned positions, biases, GELU
    export_onnx(model, tmp_path / "gpt2.onnx")
    diffs = check_onnx(model, ort_session(tmp_path / "gpt2.onnx"), atol=1e-4)
    assert max(diffs.values()) < 1e-4


def test_onnx_check_fails_for_a_graph_of_other_weights(onnx_model) -> None:
    _, path = onnx_model
    torch.manual_seed(1)
    other = Transformer(preset_config("micro")).eval()
    with pytest.raises(StageError, match="ONNX logits differ"):
        check_onnx(other, ort_session(path), atol=1e-3)


def test_rope_permute_turns_rotate_halves_into_ggml_adjacent_pairs() -> None:
    hd, pos, theta = 8, 5, 10000.0
    inv = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)  # (hd/2,)
    angle = pos * inv
    q = torch.randn(hd)
    cos, sin = torch.cat([angle.cos()] * 2), torch.cat([angle.sin()] * 2)
    ours = apply_rotary(q[None], cos, sin)[0]  # rotate halves, lmforge/HF layout
    p = rope_permute(q[:, None], 1)[:, 0]  # GGML layout: pairs (2i, 2i+1)
    ggml = torch.empty(hd)
    ggml[0::2] = p[0::2] * angle.cos() - p[1::2] * angle.sin()
    ggml[1::2] = p[0::2] * angle.sin() + p[1::2] * angle.cos()
    assert torch.allclose(ggml, rope_permute(ours[:, None], 1)[:, 0], atol=1e-6)


def test_gguf_reads_back_every_tensor_and_the_tokenizer(trained_dir: Path, tmp_path: Path) -> None:
    import gguf

    model = load_pretrained(trained_dir)
    special = {"bos_token_id": 0, "eos_token_id": 1}
    export_gguf(model, trained_dir, tmp_path / "m.gguf", special)
    summary = check_gguf(tmp_path / "m.gguf", model, trained_dir, special)
    assert summary["tensors"] == 2 + 9 * model.config.n_layer  # embeddings, final norm, blocks
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    vocab = json.loads((trained_dir / "tokenizer.json").read_text())["model"]["vocab"]
    assert all(tokens[i] == text for text, i in vocab.items())
    v = {t.name: np.asarray(t.data) for t in reader.tensors}["blk.0.attn_v.weight"]
    kv = model.config.n_kv_head * model.config.hd
    qkv = model.blocks[0].attn.qkv.weight.detach().numpy()
    assert np.array_equal(v, qkv[-kv:])  # v rows are the last of the fused projection
    torch.manual_seed(3)
    other = Transformer(model.config).eval()
    with pytest.raises(StageError, match="differs"):
        check_gguf(tmp_path / "m.gguf", other, trained_dir, special)


def test_gguf_refuses_encoders_and_non_bpe_tokenizers(tmp_path: Path) -> None:
    assert gguf_arch(preset_config("micro")) == "llama"
    assert gguf_arch(preset_config("micro-gpt2")) == "gpt2"
    with pytest.raises(ConfigError, match=r"as gpt2: causal=False \(needs True\)"):
        gguf_arch(preset_config("bert-micro"))
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece"}}))
    with pytest.raises(ConfigError, match="byte-level BPE tokenizers only"):
        tokenizer_metadata(tmp_path, {}, 256)


def test_export_stage_writes_checked_onnx_and_gguf(trained_dir: Path, tmp_path: Path) -> None:
    out = compress(CompressConfig(method="export", model=trained_dir, out=tmp_path / "x"))
    report = json.loads((out / "compression.json").read_text())
    assert report["onnx"]["prefill_max_abs_diff"] < 1e-3
    assert report["onnx"]["decode_max_abs_diff"] < 1e-3
    assert report["onnx"]["tokens_per_s"] > 0 and report["gguf"]["tokens"] > 0
    assert (out / "onnx" / "tokenizer.json").is_file() and (out / "model.gguf").is_file()
    assert (out / "manifest.json").is_file()


def gguf_f32_only(**kw) -> CompressConfig:
    return CompressConfig(method="export", export={"formats": ["gguf"], "gguf_type": "f32"}, **kw)


def test_an_f32_gguf_reuses_the_originals_quality(trained_dir, data_dir, tmp_path, monkeypatch):
    from lmforge.compress import export

    def scored_again(*args, **kwargs):
        raise AssertionError("the f32 GGUF's weights are the original's: already scored")

    monkeypatch.setattr(export, "quality", scored_again)
    out = compress(gguf_f32_only(model=trained_dir, data=data_dir, out=tmp_path / "x"))
    report = json.loads((out / "compression.json").read_text())
    assert report["gguf"]["max_abs_logit_diff"] == 0.0
    assert report["gguf"]["perplexity"] == report["before"]["perplexity"] > 1
    assert report["gguf"]["bits_per_byte"] == report["before"]["bits_per_byte"]


def test_a_quantized_source_is_measured_as_it_runs(trained_dir, data_dir, tmp_path, monkeypatch):
    from lmforge.compress import measure
    from lmforge.compress.quantize import quantize_dir
    from lmforge.evals.lm import EvalModel
    from lmforge.evals.perplexity import read_texts
    from lmforge.model.quant import QuantLinear

    quantize_dir(trained_dir, tmp_path / "q", "int8", 32)
    measured, report_of = [], measure.model_report

    def spy(model, *args):
        measured.append(any(isinstance(m, QuantLinear) for m in model.model.modules()))
        return report_of(model, *args)

    monkeypatch.setattr(measure, "model_report", spy)
    out = compress(gguf_f32_only(model=tmp_path / "q", data=data_dir, out=tmp_path / "x"))
    assert measured == [True]  # "before": the kept int8 model, as serve and eval run it
    report = json.loads((out / "compression.json").read_text())
    floats = EvalModel.load(tmp_path / "q", quantized="dequantize")  # what the GGUF holds
    want = measure.quality(floats, read_texts(data_dir, "val", limit=64))
    assert report["gguf"]["perplexity"] == pytest.approx(want["perplexity"], rel=1e-6)


def test_a_decoder_classifier_exports_its_label_logits_not_the_lm(tmp_path: Path) -> None:
    from lmforge.evals.lm import EvalModel
    from lmforge.finetune.heads import SequenceClassifier
    from lmforge.model.convert import save_pretrained
    from lmforge.tokenizer.files import TokenizerFiles, copy_tokenizer_files
    from unit.finetune.helpers import make_tokenizer_dir

    tok_dir = make_tokenizer_dir(tmp_path / "tok")
    tok = TokenizerFiles.load(tok_dir)
    torch.manual_seed(0)
    model = SequenceClassifier(Transformer(preset_config("micro", vocab_size=tok.vocab_size)), 3)
    with torch.no_grad():
        model.head.weight.normal_(std=0.5)  # logits far enough apart to tell rows apart
    head = model.classifier_head(["a", "b", "c"])
    save_pretrained(model.lm, tmp_path / "cls", extra_config={"pad_token_id": tok.pad_id},
                    classifier=head)  # fmt: skip
    copy_tokenizer_files(tok_dir, tmp_path / "cls")
    with pytest.raises(ConfigError, match=r"is a classifier: export to GGUF .*formats=\[onnx\]"):
        compress(CompressConfig(method="export", model=tmp_path / "cls", out=tmp_path / "g"))
    values = {"method": "export", "model": tmp_path / "cls", "out": tmp_path / "x",
              "export": {"formats": ["onnx"]}}  # fmt: skip
    out = compress(CompressConfig.model_validate(values))
    report = json.loads((out / "compression.json").read_text())
    assert report["onnx"]["max_abs_logit_diff"] < 1e-4 and "tokens_per_s" not in report["onnx"]
    config = json.loads((out / "onnx" / "config.json").read_text())
    assert config["architectures"][0].endswith("ForSequenceClassification")
    # onnxruntime on a right- or left-padded batch of texts (and one alone: batch 1) gives what
    # the eval stage scores per text
    texts = ["The capital is Paris.", "def f(x)", "Return the absolute value of a number."]
    rows = [torch.tensor(tok.encode(t)) for t in texts]
    want = np.asarray([EvalModel.load(tmp_path / "cls").classify(t) for t in texts])
    assert np.abs(want[0] - want[1]).max() > 1e-3  # the rows differ: each read at its own end
    session = ort_session(out / "onnx" / "model.onnx")
    for batch, expect in ((rows, want), (rows[1:2], want[1:2])):
        for left in (False, True):
            ids, mask = pad_rows(batch, tok.pad_id, None, left=left)
            feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
            (logits,) = session.run(None, feed)
            assert logits.shape == (len(batch), 3)
            got = torch.log_softmax(torch.from_numpy(logits), -1).numpy()
            assert np.abs(got - expect).max() < 1e-4, f"left={left}, batch of {len(batch)}"
    other = torch.nn.Linear(model.lm.config.n_embd, 3, bias=False)  # another head's weights
    with pytest.raises(StageError, match="ONNX classifier logits differ from PyTorch"):
        check_classifier_onnx(
            model.lm, other, tok.pad_id, ort_session(out / "onnx" / "model.onnx"), 1e-4
        )
