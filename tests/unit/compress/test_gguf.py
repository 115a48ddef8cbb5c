"""GGUF export as llama.cpp reads it: tokenizer metadata, file types, and llama.cpp itself.

The metadata tests read the file back with gguf's reader and need no llama.cpp. The one test
marked `integration` runs benchmarks/check_gguf_llamacpp.py, which loads the export in llama.cpp
through llama-cpp-python; CI does not install llama.cpp (compiling it takes many minutes), so that
test is skipped there, and only there: whenever `llama_cpp` cannot be imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.compress.export import gguf_rounded
from lmforge.compress.gguf_export import (
    CONTROL,
    NORMAL,
    UNUSED,
    USER_DEFINED,
    check_gguf,
    export_gguf,
    gguf_tensors,
    tokenizer_metadata,
)
from lmforge.compress.quantize import quantize_dir
from lmforge.compress.stage import CompressConfig, compress
from lmforge.config import load_config
from lmforge.errors import ConfigError
from lmforge.evals.report import write_report
from lmforge.model.config import preset_config
from lmforge.model.convert import load_pretrained, save_pretrained
from lmforge.model.transformer import Transformer
from lmforge.tokenizer.train import SpecialTokens, TokenizerConfig, build_tokenizer
from unit.evals.helpers import CORPUS, train_briefly

gguf = pytest.importorskip("gguf")
SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "check_gguf_llamacpp.py"
SPECIALS = SpecialTokens(bos="<|bos|>", eos="<|eos|>", extra=["<tool>"])


def lmforge_tokenizer(tmp_path: Path, **settings):
    """A byte-level BPE tokenizer built as `lmforge tokenizer train` builds it."""
    settings = {"vocab_size": 300, **settings}
    cfg = TokenizerConfig(data=tmp_path, out=tmp_path, min_frequency=1, special_tokens=SPECIALS,
                          **settings)  # fmt: skip
    return build_tokenizer(cfg, iter(CORPUS * 4))


def model_dir(path: Path, tok, vocab_size: int | None = None, preset: str = "micro") -> Path:
    """A micro model directory with tok, its special ids and a stop set ending chat turns."""
    torch.manual_seed(0)
    cfg = preset_config(preset, vocab_size=vocab_size or tok.get_vocab_size())
    ids = {"bos_token_id": tok.token_to_id("<|bos|>"), "eos_token_id": tok.token_to_id("<|eos|>")}
    stops = {**ids, "eos_token_id": [ids["eos_token_id"], tok.token_to_id("<|im_end|>")]}
    save_pretrained(Transformer(cfg).eval(), path, extra_config=ids, generation_config=stops)
    tok.save(str(path / "tokenizer.json"))
    return path


def read_fields(path: Path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {key: field.contents() for key, field in reader.fields.items()}


def test_pre_tokenizer_is_the_one_llama_cpp_cuts_like_ours(tmp_path: Path) -> None:
    digits = tokenizer_metadata(model_dir(tmp_path / "a", lmforge_tokenizer(tmp_path)), {}, 320)
    assert digits["pre"] == "smollm"  # \p{N} then GPT-2's regex, no space clean-up
    plain = lmforge_tokenizer(tmp_path, split_digits=False)
    assert tokenizer_metadata(model_dir(tmp_path / "b", plain), {}, 320)["pre"] == "trillion"
    for settings, problem in (({"pre_tokenizer": "gpt4"}, "Split"),
                              ({"normalization": ["lowercase"]}, "Lowercase")):  # fmt: skip
        directory = model_dir(tmp_path / problem, lmforge_tokenizer(tmp_path, **settings))
        with pytest.raises(ConfigError, match=f"{problem}.*no llama.cpp equivalent"):
            tokenizer_metadata(directory, {}, 320)


def test_gguf_tokenizer_metadata_types_padding_and_special_ids(tmp_path: Path) -> None:
    tok = lmforge_tokenizer(tmp_path)
    tok.add_tokens(["NOT_SPECIAL"])  # an added token that is not special: user-defined
    n = tok.get_vocab_size()
    directory = model_dir(tmp_path / "m", tok, vocab_size=n + 3)  # embeddings padded past vocab
    model = load_pretrained(directory)
    special = {"bos_token_id": 1, "eos_token_id": 0}
    export_gguf(model, directory, tmp_path / "m.gguf", special)
    check_gguf(tmp_path / "m.gguf", model, directory, special)
    fields = read_fields(tmp_path / "m.gguf")
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == n + 3  # llama.cpp needs one token per embedding row
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, n + 3)] and types[n:] == [UNUSED] * 3
    assert types[tok.token_to_id("<|eos|>")] == types[tok.token_to_id("<tool>")] == CONTROL
    assert types[tok.token_to_id("NOT_SPECIAL")] == USER_DEFINED
    assert types[tok.encode(" return").ids[0]] == NORMAL
    assert fields["tokenizer.ggml.pre"] == "smollm"
    assert fields["tokenizer.ggml.add_bos_token"] is True  # lmforge starts a raw text with BOS
    assert fields["tokenizer.ggml.eos_token_id"] == 0 and fields["tokenizer.ggml.bos_token_id"] == 1
    assert fields["tokenizer.ggml.eot_token_id"] == tok.token_to_id("<|im_end|>")
    gpt2_like = tokenizer_metadata(directory, {"eos_token_id": 0}, n + 3)  # EOS starts documents
    assert gpt2_like["bos_token_id"] == 0 and gpt2_like["add_bos"] is True
    assert tokenizer_metadata(directory, {}, n + 3)["add_bos"] is False


def test_gguf_f16_and_q8_0_store_matrices_rounded_and_norms_in_f32(tmp_path: Path) -> None:
    directory = model_dir(tmp_path / "m", lmforge_tokenizer(tmp_path))
    model = load_pretrained(directory)
    sizes = {}
    for file_type, matrix_type in (("f32", "F32"), ("f16", "F16"), ("q8_0", "Q8_0")):
        path = tmp_path / f"{file_type}.gguf"
        export_gguf(model, directory, path, {}, file_type)
        assert check_gguf(path, model, directory, {}, file_type)["tensors"] == 2 + 9 * 2
        tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
        assert tensors["blk.1.ffn_down.weight"].tensor_type.name == matrix_type
        assert tensors["blk.1.ffn_norm.weight"].tensor_type.name == "F32"
        sizes[file_type] = path.stat().st_size
        embd = tensors["token_embd.weight"]
        values = gguf.quants.dequantize(np.asarray(embd.data), embd.tensor_type)
        weight = model.tok_emb.weight.detach().numpy()
        assert np.abs(values.reshape(weight.shape) - weight).max() <= np.abs(weight).max() / 100
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"]


def test_gguf_refuses_q8_0_rows_and_tokenizers_that_do_not_fit(tmp_path: Path) -> None:
    tok = lmforge_tokenizer(tmp_path)
    directory = model_dir(tmp_path / "m", tok)
    odd = Transformer(preset_config("micro", n_embd=48, vocab_size=tok.get_vocab_size())).eval()
    with pytest.raises(ConfigError, match=r"token_embd\.weight has rows of 48 values.*f16"):
        export_gguf(odd, directory, tmp_path / "x.gguf", {}, "q8_0")
    with pytest.raises(ConfigError, match="GGUF file type 'q4'"):
        export_gguf(load_pretrained(directory), directory, tmp_path / "x.gguf", {}, "q4")
    with pytest.raises(ConfigError, match="beyond the model's vocab_size 256"):
        tokenizer_metadata(directory, {}, 256)


def test_gguf_refuses_a_model_kept_quantized_and_names_the_float_load(tmp_path: Path) -> None:
    directory = model_dir(tmp_path / "m", lmforge_tokenizer(tmp_path))
    quantize_dir(directory, tmp_path / "q", "int8", 32)
    kept = load_pretrained(tmp_path / "q")
    with pytest.raises(ConfigError, match="quantized='dequantize'"):
        export_gguf(kept, tmp_path / "q", tmp_path / "x.gguf", {}, "f32")
    assert not (tmp_path / "x.gguf").exists()
    floats = load_pretrained(tmp_path / "q", quantized="dequantize")
    assert len(gguf_tensors(floats)) == 2 + 9 * 2


def test_gpt2_style_models_export_as_llama_cpp_gpt2(tmp_path: Path) -> None:
    directory = model_dir(tmp_path / "m", lmforge_tokenizer(tmp_path), preset="micro-gpt2")
    model = load_pretrained(directory)
    export_gguf(model, directory, tmp_path / "m.gguf", {}, "f16")
    assert (
        check_gguf(tmp_path / "m.gguf", model, directory, {}, "f16")["tensors"] == 4 + 12 * 2
    )  # embeddings, positions, final norm + bias
    fields = read_fields(tmp_path / "m.gguf")
    assert fields["general.architecture"] == "gpt2" and fields["gpt2.context_length"] == 128
    assert fields["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    qkv = model.blocks[0].attn.qkv
    assert np.array_equal(tensors["blk.0.attn_qkv.bias"], qkv.bias.detach().numpy())  # f32 kept
    assert np.array_equal(tensors["blk.0.attn_qkv.weight"], qkv.weight.detach().half().numpy())
    assert tensors["position_embd.weight"].shape == (128, 64)  # (block_size, n_embd)


def test_rounded_model_holds_exactly_the_weights_the_q8_0_file_stores(tmp_path: Path) -> None:
    directory = model_dir(tmp_path / "m", lmforge_tokenizer(tmp_path))
    model = load_pretrained(directory)
    export_gguf(model, directory, tmp_path / "q.gguf", {}, "q8_0")
    stored = {
        t.name: gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(t.shape[::-1])
        for t in gguf.GGUFReader(str(tmp_path / "q.gguf")).tensors
    }
    rounded = gguf_tensors(gguf_rounded(model, "q8_0"))
    assert set(rounded) == set(stored)
    for name, values in rounded.items():  # q/k rows permuted and split after rounding: equal
        assert np.array_equal(values, stored[name].reshape(values.shape)), name
    assert not np.array_equal(
        rounded["blk.0.attn_q.weight"], gguf_tensors(model)["blk.0.attn_q.weight"]
    )
    assert gguf_rounded(model, "f32") is model


@pytest.mark.parametrize("file_type", ["f16", "q8_0"])
def test_export_stage_writes_the_configured_gguf_type_and_measures_it(
    trained_dir: Path, data_dir: Path, tmp_path: Path, file_type: str
) -> None:
    cfg = load_config(
        CompressConfig,
        values={"method": "export", "model": trained_dir, "data": data_dir, "out": tmp_path / "x"},
        overrides=["export.formats=[gguf]", f"export.gguf_type={file_type}",
                   "speed.new_tokens=4"],
    )  # fmt: skip
    out = compress(cfg)
    tensors = {t.name: t for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == file_type.upper()
    assert tensors["token_embd.weight"].tensor_type.name == file_type.upper()
    assert tensors["output_norm.weight"].tensor_type.name == "F32"
    report = json.loads((out / "compression.json").read_text())
    gguf_row = report["gguf"]
    assert gguf_row["file_type"] == file_type
    assert gguf_row["weights_bytes"] == (out / "model.gguf").stat().st_size
    assert report["after"]["weights_bytes"] == gguf_row["weights_bytes"]
    assert 0 < gguf_row["max_abs_logit_diff"] < (0.05 if file_type == "f16" else 0.5)
    before = report["before"]["perplexity"]
    assert gguf_row["perplexity"] == report["after"]["perplexity"] != before
    assert abs(gguf_row["perplexity"] / before - 1) < 0.05  # rounding, not a different model
    assert report["size_ratio"] < (0.6 if file_type == "f16" else 0.4)
    page = write_report(tmp_path).read_text()
    assert f"<td>GGUF {file_type}</td>" in page and "GGUF f32" not in page
    assert f"logits within {gguf_row['max_abs_logit_diff']:.1e}" in page


def test_a_bad_gguf_type_is_a_config_error_naming_the_field(trained_dir: Path) -> None:
    values = {"method": "export", "model": trained_dir, "out": trained_dir / "never"}
    with pytest.raises(ConfigError, match=r"'export\.gguf_type': 'q4'.*'f32', 'f16' or 'q8_0'"):
        load_config(CompressConfig, values=values, overrides=["export.gguf_type=q4"])


@pytest.mark.integration
@pytest.mark.parametrize("preset", ["micro", "micro-gpt2"])
def test_llama_cpp_tokenizes_scores_and_decodes_like_lmforge(tmp_path: Path, preset: str) -> None:
    """Needs llama-cpp-python (CI has no llama.cpp: skipped there, see the module docstring)."""
    pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (lmforge[gguf-check])"
    )
    tok = lmforge_tokenizer(tmp_path, vocab_size=600)  # all CORPUS merges: "Ġ+" spans a cut of
    # llama.cpp's "default" pre-tokenizer, which the export wrote before
    directory = train_briefly(model_dir(tmp_path / "m", tok, preset=preset), CORPUS, 40)
    out = tmp_path / "check.json"
    args = [str(directory), "--types", "f32,f16,q8_0", "--new-tokens", "12", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {r["file_type"]: r for r in json.loads(out.read_text())["results"]}
    for r in results.values():
        assert r["tokenize_equal"] == r["texts"] and r["mismatches"] == []
    assert results["f32"]["max_abs_logit_diff"] < (1e-3 if preset == "micro" else 6e-3)
    assert results["f32"]["greedy_agree"] == ["12/12"] * 4 and results["f32"]["texts_equal"] == 4
    assert results["q8_0"]["max_abs_logit_diff"] < 0.5
