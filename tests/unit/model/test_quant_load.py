"""Quantized checkpoints load quantized: codes as stored, logits equal to dequantizing on load."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.compress.quantize import quantize_dir
from lmforge.errors import ConfigError, InputError
from lmforge.evals.lm import EvalModel
from lmforge.model import quant
from lmforge.model.convert import load_pretrained, save_pretrained
from lmforge.model.int4pack import int4pack_layout
from lmforge.model.quant import (
    QuantEmbedding,
    QuantLinear,
    dequantize_weight,
    int8_kernel_available,
    quantize_weight,
)
from lmforge.model.quant_checkpoint import QuantWeight, keep_quantized
from unit.evals.helpers import make_model_dir

IDS = torch.arange(1, 30)[None]


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer (a tied table once)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """A llama-shaped and a GPT-2-shaped micro model, each as fp32, int8 and int4 directories."""
    root = tmp_path_factory.mktemp("quant-load")
    out = {}
    for preset in ("micro", "micro-gpt2"):
        src = make_model_dir(root / preset, preset=preset)
        out[preset] = src
        for kind in ("int8", "int4"):
            quantize_dir(src, root / f"{preset}-{kind}", kind, 32)
            out[f"{preset}-{kind}"] = root / f"{preset}-{kind}"
    return out


@pytest.mark.parametrize("preset", ["micro", "micro-gpt2"])
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_kept_logits_equal_dequantized_on_load(dirs, preset: str, kind: str) -> None:
    kept = load_pretrained(dirs[f"{preset}-{kind}"])
    floats = load_pretrained(dirs[f"{preset}-{kind}"], quantized="dequantize")
    assert not any(type(m) in (nn.Linear, nn.Embedding) for m in kept.modules())
    assert not any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in floats.modules())
    bits = {m.bits for m in kept.modules() if isinstance(m, (QuantLinear, QuantEmbedding))}
    assert bits == {int(kind[3:])}
    with torch.no_grad():
        ref, got = floats(IDS), kept(IDS)
    # without a kernel: the same fp32 matmuls. int8 and int4 run torch's kernels with bf16
    # activations (quant.KERNEL_DTYPE; int4 also bf16 scales): bf16 rounding, inside their error
    kernel = int8_kernel_available() if kind == "int8" else int4pack_layout() is not None
    tolerance = 1e-2 if kernel else 1e-5
    assert (ref - got).abs().max().item() < tolerance * ref.abs().max().item()


def test_kept_model_holds_a_quarter_of_the_bytes_and_shares_the_tied_table(dirs) -> None:
    fp32 = tensor_bytes(load_pretrained(dirs["micro"]))
    int8, int4 = (load_pretrained(dirs[f"micro-{k}"]) for k in ("int8", "int4"))
    assert tensor_bytes(int8) < 0.3 * fp32
    assert tensor_bytes(int4) < 0.65 * tensor_bytes(int8)
    assert int8.config.tie_embeddings and int8.lm_head.codes is int8.tok_emb.codes
    assert EvalModel.load(dirs["micro-int8"]).num_params() == sum(
        p.numel() for p in load_pretrained(dirs["micro"]).parameters()
    )


def test_the_load_says_it_kept_quantized_weights(dirs, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="lmforge.model.convert"):
        model = load_pretrained(dirs["micro-gpt2-int8"])
    n = sum(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())
    assert f"kept {n} matrices quantized (int8)" in caplog.text


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_save_pretrained_refuses_a_kept_model_saying_what_to_do(dirs, tmp_path, kind) -> None:
    model = load_pretrained(dirs[f"micro-{kind}"])
    with pytest.raises(
        ConfigError, match=rf"keeps \d+ module\(s\) quantized .*int{kind[3]}.*dequantize"
    ):
        save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before any file
    floats = load_pretrained(dirs[f"micro-{kind}"], quantized="dequantize")
    save_pretrained(floats, tmp_path / "out")  # the way out the error names
    assert torch.allclose(load_pretrained(tmp_path / "out")(IDS), floats(IDS))


def test_an_unknown_quantized_mode_is_refused(dirs) -> None:
    with pytest.raises(ConfigError, match="quantized='fp16'; valid: keep, dequantize"):
        load_pretrained(dirs["micro-int8"], quantized="fp16")


@pytest.mark.parametrize("per_column", [False, True])
def test_int8_linear_matches_its_dequantized_weight(per_column: bool) -> None:
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    codes, scale = quantize_weight(w.T if per_column else w, 8, 32)  # Conv1D: scale per column
    layer = QuantLinear(64, 48, 8, bias=True, transposed=per_column)
    if per_column:
        codes, scale = codes.T.contiguous(), scale.T
    layer.codes, layer.scale, layer.bias = codes, scale, torch.randn(48)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        got = layer(x)  # the int8 kernel, bf16 activations
    ref = F.linear(x, codes.float() * scale, layer.bias)
    assert (got - ref).abs().max() < 1e-2 * ref.abs().max() and got.shape == (2, 5, 48)
    x.requires_grad_(True)  # QLoRA's path: autograd through the dequantized fp32 weight
    out = layer(x)
    assert torch.allclose(out, ref, atol=1e-5)
    out.sum().backward()
    assert torch.allclose(x.grad[0, 0], (codes.float() * scale).sum(0), atol=1e-5)


def test_kept_int8_inference_runs_the_int8_kernel(dirs) -> None:
    # torch >= 2.6 on CPU has aten._weight_int8pack_mm; without it, QuantLinear dequantizes each
    # forward (the equality tests above hold either way)
    if not int8_kernel_available():
        pytest.skip("this torch build has no CPU _weight_int8pack_mm")
    model = load_pretrained(dirs["micro-gpt2-int8"])
    with torch.no_grad(), torch.profiler.profile() as prof:
        model(IDS)
    calls = [e for e in prof.events() if e.name == "aten::_weight_int8pack_mm"]
    n_linear = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert len(calls) == n_linear > 0


def test_parts_of_different_bits_are_not_fused() -> None:
    a = QuantWeight(torch.zeros(4, 8, dtype=torch.int8), torch.ones(4, 1), 8, 32)
    b = QuantWeight(torch.zeros(4, 4, dtype=torch.uint8), torch.ones(4, 1, 1), 4, 8)
    assert a.fused([b], transpose=False) is None
    both = a.fused([a], transpose=False)
    assert both.codes.shape == (8, 8) and both.shape == (8, 8)


def test_an_encoder_and_an_encoder_decoder_keep_their_codes_too(tmp_path: Path) -> None:
    from lmforge.model.config import preset_config
    from lmforge.model.convert import save_pretrained
    from lmforge.model.seq2seq import Seq2SeqLM

    torch.manual_seed(0)
    save_pretrained(Seq2SeqLM(preset_config("bart-micro", vocab_size=300)), tmp_path / "bart")
    make_model_dir(tmp_path / "bert", preset="bert-micro")
    tgt = torch.arange(2, 9)[None]
    for name in ("bart", "bert"):
        quantize_dir(tmp_path / name, tmp_path / f"{name}-q", "int8", 32)
        kept = load_pretrained(tmp_path / f"{name}-q")
        floats = load_pretrained(tmp_path / f"{name}-q", quantized="dequantize")
        assert isinstance(kept.tok_emb, QuantEmbedding) and isinstance(kept.lm_head, QuantLinear)
        with torch.no_grad():
            ref, got = (m(IDS, tgt) if name == "bart" else m(IDS) for m in (floats, kept))
        assert (ref - got).abs().max().item() < 1e-2 * ref.abs().max().item()  # bf16 kernel


@pytest.mark.parametrize("transposed", [False, True])
def test_int4_linear_dequantizes_in_chunks_to_the_same_result(monkeypatch, transposed) -> None:
    torch.manual_seed(0)
    stored = torch.randn(64, 96)  # (out, in), or (in, out) as GPT-2's Conv1D stores it
    codes, scale = quantize_weight(stored, 4, 32)
    out_f, in_f = (96, 64) if transposed else (64, 96)
    layer = QuantLinear(in_f, out_f, 4, 32, bias=False, transposed=transposed)
    layer.codes, layer.scale = codes, scale
    w = dequantize_weight(codes, scale, 4, 32)
    x = torch.randn(3, in_f)
    ref = x @ w if transposed else x @ w.T
    whole = layer(x)
    monkeypatch.setattr(quant, "INT4_CHUNK_WEIGHTS", 96 * 5)  # 5 stored rows a chunk
    assert torch.allclose(layer(x), ref, atol=1e-5) and torch.allclose(whole, ref, atol=1e-5)


def test_a_config_that_is_not_the_checkpoints_is_refused_when_kept(dirs, tmp_path) -> None:
    import json
    import shutil

    bad = shutil.copytree(dirs["micro-int8"], tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] + 8}))
    for mode in ("keep", "dequantize"):  # kept codes must not take the checkpoint's shape
        with pytest.raises(InputError, match=f"{bad}: weights do not match config.json"):
            load_pretrained(bad, quantized=mode)


def test_a_quantization_config_without_bits_is_refused_naming_the_directory(dirs, tmp_path):
    import json
    import shutil

    bad = shutil.copytree(dirs["micro-int4"], tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    del cfg["quantization_config"]["bits"]
    (bad / "config.json").write_text(json.dumps(cfg))
    for mode in ("keep", "dequantize"):
        with pytest.raises(InputError, match=f"{bad}: .*quantization_config lacks bits"):
            load_pretrained(bad, quantized=mode)


def test_a_quantized_name_the_model_lacks_is_left_for_load_state_dict() -> None:
    model = nn.Sequential(nn.Linear(8, 4))
    w = QuantWeight(torch.zeros(4, 8, dtype=torch.int8), torch.ones(4, 1), 8, 32)
    state = keep_quantized(model, {"0.weight": w, "5.weight": w, "0.proj.weight": w})
    assert isinstance(model[0], QuantLinear)
    assert set(state) == {"0.codes", "0.scale", "5.weight", "0.proj.weight"}
    assert state["5.weight"].shape == (4, 8) and state["5.weight"].is_floating_point()


def test_int8_base_trains_in_fp32_even_where_its_input_needs_no_gradient() -> None:
    # QLoRA: the first block's input comes from frozen embeddings (no requires_grad); with grad
    # enabled its base matmul must not drop to the kernel's bf16 activations
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(64, 48), "int8")
    x = torch.randn(4, 64)
    ref = F.linear(x, layer.weight, layer.bias)
    assert torch.allclose(layer(x), ref, atol=1e-5)


@pytest.mark.parametrize("preset", ["micro", "bert-micro"])
def test_a_quantized_classifiers_head_loads_dequantized(tmp_path: Path, preset: str) -> None:
    from lmforge.model.config import preset_config
    from lmforge.model.convert import ClassifierHead, load_classifier, save_pretrained
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    cfg = preset_config(preset, vocab_size=320)
    d = cfg.n_embd
    encoder = not cfg.causal  # a BERT head: biased, behind a dense+tanh pooler
    head = ClassifierHead(
        torch.randn(3, d), ["a", "b", "c"], *(
            (torch.randn(3), torch.randn(d, d), torch.randn(d)) if encoder else ()
        )
    )  # fmt: skip
    save_pretrained(Transformer(cfg), tmp_path / "f", classifier=head)
    quantize_dir(tmp_path / "f", tmp_path / "q", "int8", 32)
    back = load_classifier(tmp_path / "q")
    rounded = dequantize_weight(*quantize_weight(head.weight, 8, 32), 8, 32)
    assert back.labels == head.labels and torch.allclose(back.weight, rounded)
    if encoder:  # each matrix its codes times its scale, never the raw int8 codes
        pool = dequantize_weight(*quantize_weight(head.pool_weight, 8, 32), 8, 32)
        assert torch.allclose(back.pool_weight, pool) and torch.equal(back.bias, head.bias)
