"""int4 weights repacked for torch's CPU int4 kernel: the same weights, one layout, a fallback."""

from __future__ import annotations

import dataclasses
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.compress.quantize import quantize_dir
from lmforge.model import quant
from lmforge.model.convert import load_pretrained
from lmforge.model.int4pack import Layout, int4pack_layout
from lmforge.model.quant import QuantEmbedding, QuantLinear, dequantize_weight, quantize_weight
from lmforge.model.quant_checkpoint import QuantWeight, keep_quantized
from unit.evals.helpers import make_model_dir

needs_kernel = pytest.mark.skipif(
    int4pack_layout() is None, reason="this torch has no working CPU int4 kernel (torch < 2.6)"
)
IDS = torch.arange(1, 30)[None]


def packed_linear(w: torch.Tensor, group_size: int) -> tuple[QuantLinear, torch.Tensor]:
    """A kernel-packed QuantLinear of w, loaded as a checkpoint loads it, and our scales."""
    codes, scale = quantize_weight(w, 4, group_size)
    model = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias=False))
    state = keep_quantized(model, {"0.weight": QuantWeight(codes, scale, 4, group_size)})
    model.load_state_dict(state, assign=True)
    return model[0], scale


@needs_kernel
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_repacked_weights_are_ours_up_to_bf16_scales(group_size: int) -> None:
    torch.manual_seed(0)
    w = torch.randn(112, 256)  # a full 64-row block and a short one of 48
    layer, scale = packed_linear(w, group_size)
    assert layer.kernel_packed and not hasattr(layer, "codes")
    ours = dequantize_weight(*quantize_weight(w, 4, group_size), 4, group_size)
    # exactly our codes times our scales rounded to bf16: the only difference
    bf16 = dequantize_weight(*quantize_weight(w, 4, group_size)[:1], scale.bfloat16().float(), 4,
                             group_size)  # fmt: skip
    assert torch.equal(layer.weight, bf16)
    diff = (layer.weight - ours).abs().max().item()  # 0.0099 on this weight, every group size
    bound = 8 * (scale - scale.bfloat16().float()).abs().max().item()
    assert 0 < diff <= bound < 2**-8 * ours.abs().max().item()
    x = torch.randn(3, 5, 256)
    with torch.no_grad():  # the kernel: bf16 activations
        got = layer(x)
    ref = F.linear(x, ours)
    assert got.shape == (3, 5, 112) and (got - ref).abs().max() < 1e-2 * ref.abs().max()
    x.requires_grad_(True)  # grad enabled: the kernel too, x's gradient off the weight read back
    y = layer(x)
    assert torch.equal(y.detach(), got)
    grad = torch.randn_like(y)
    y.backward(grad)
    assert torch.allclose(x.grad, grad @ bf16, rtol=1e-5, atol=1e-4)


def in_file_mapping(model: torch.nn.Module, file: Path) -> list[str]:
    """The model's buffers whose memory lies in a mapping of `file` (Linux: /proc/self/maps),
    which would keep the whole file resident."""
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[5] == str(file.resolve()):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            spans.append((lo, hi))
    return [n for n, b in model.named_buffers() if any(lo <= b.data_ptr() < hi for lo, hi in spans)]


def micro_int4(tmp_path: Path, preset: str = "micro", **changes: object) -> Path:
    """An int4 directory of a micro model (llama-style by default; `changes` to its config)."""
    from lmforge.model.config import preset_config
    from lmforge.model.convert import save_pretrained
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    config = dataclasses.replace(preset_config(preset), **changes)
    save_pretrained(Transformer(config), tmp_path / "f")
    quantize_dir(tmp_path / "f", tmp_path / "q", "int4", 32)
    return tmp_path / "q"


@needs_kernel
def test_a_kept_int4_model_runs_the_kernel_and_holds_one_layout(tmp_path: Path) -> None:
    model = load_pretrained(micro_int4(tmp_path))
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert all(m.kernel_packed and not hasattr(m, "codes") for m in linears)
    assert isinstance(model.tok_emb, QuantEmbedding) and model.tok_emb.kernel_packed
    assert model.lm_head.int4pack is model.tok_emb.int4pack  # the tied table's bytes, once
    assert not any(name.endswith(".codes") for name, _ in model.named_buffers())
    with torch.no_grad(), torch.profiler.profile() as prof:
        model(IDS)
    calls = [e for e in prof.events() if e.name == "aten::_weight_int4pack_mm_for_cpu"]
    assert len(calls) == len(linears) > 0
    floats = load_pretrained(tmp_path / "q", quantized="dequantize")
    assert torch.allclose(model.tok_emb(IDS), floats.tok_emb(IDS), atol=0.02)  # bf16 scales


def test_a_group_size_the_kernel_lacks_keeps_our_layout(tmp_path: Path) -> None:
    src = make_model_dir(tmp_path / "f", preset="micro")
    quantize_dir(src, tmp_path / "q", "int4", 16)
    model = load_pretrained(tmp_path / "q")
    kept = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
    assert kept and not any(m.kernel_packed for m in kept)
    assert model.lm_head.codes is model.tok_emb.codes  # the tied pair's, once
    assert not in_file_mapping(model, tmp_path / "q" / "model.safetensors")  # copied out of it
    floats = load_pretrained(tmp_path / "q", quantized="dequantize")
    with torch.no_grad():
        ref, got = floats(IDS), model(IDS)
    assert (ref - got).abs().max() < 1e-5 * ref.abs().max()


def test_without_the_ops_int4_stays_in_our_layout(monkeypatch) -> None:
    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None, raising=False)
    int4pack_layout.cache_clear()
    try:
        assert int4pack_layout() is None
        torch.manual_seed(0)
        codes, scale = quantize_weight(torch.randn(64, 64), 4, 32)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False))
        keep_quantized(model, {"0.weight": QuantWeight(codes, scale, 4, 32)})
        assert not model[0].kernel_packed
    finally:
        monkeypatch.undo()
        int4pack_layout.cache_clear()


def test_a_failing_int8_kernel_is_a_clean_fallback(monkeypatch) -> None:
    def other_signature(x, w, scales, extra):  # a torch whose op takes other arguments
        raise AssertionError("not reached")

    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", other_signature)
    quant.int8_kernel_available.cache_clear()
    try:
        assert not quant.int8_kernel_available()
        layer = QuantLinear.from_linear(torch.nn.Linear(64, 48), "int8")
        x = torch.randn(2, 64)
        with torch.no_grad():
            assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5)
    finally:
        monkeypatch.undo()
        quant.int8_kernel_available.cache_clear()


@needs_kernel
@pytest.mark.parametrize(
    ("capability", "layout"),
    [("avx2", Layout(32, True)), ("default", Layout(32, False))],
)
def test_each_cpu_layout_is_found_and_read_back(capability: str, layout: Layout) -> None:
    # torch packs int4 per CPU vector width (this machine: AVX-512, Layout(64, True)); ATen's
    # ATEN_CPU_CAPABILITY picks a narrower one in a fresh process
    script = (
        "import torch\n"
        "from lmforge.model.int4pack import int4pack_layout, pack, dequantize\n"
        "from lmforge.model.quant import quantize_weight, dequantize_weight\n"
        "lay = int4pack_layout()\n"
        "torch.manual_seed(0)\n"
        "codes, scale = quantize_weight(torch.randn(72, 64), 4, 32)\n"  # padded to 80
        "w = dequantize(*pack(codes, scale, 32), 32, lay, 72)\n"
        "ok = torch.equal(w, dequantize_weight(codes, scale.bfloat16().float(), 4, 32))\n"
        "print(tuple(lay), ok)\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert out.stdout.split("\n")[0] == f"{tuple(layout)} True", out.stderr


@pytest.mark.parametrize("flip", [True, False])
def test_gpt2_conv1d_weights_quantize_along_their_input(tmp_path: Path, monkeypatch, flip) -> None:
    from lmforge.compress import quantize

    src = make_model_dir(tmp_path / "f", preset="micro-gpt2")  # Conv1D weights, stored (in, out)
    if not flip:  # a checkpoint written before "flipped": int4 grouped along the output
        monkeypatch.setattr(quantize, "stored_transposed", lambda hf, names: set())
    config = quantize_dir(src, tmp_path / "q", "int4", 32)
    assert len(config.get("flipped", [])) == (8 if flip else 0)  # 4 linears x 2 blocks
    floats = load_pretrained(tmp_path / "q", quantized="dequantize")
    weight = load_pretrained(src).blocks[0].attn.qkv.weight.detach()  # (out, in)
    codes, scale = quantize_weight(weight if flip else weight.T, 4, 32)
    rounded = dequantize_weight(codes, scale, 4, 32)
    assert torch.equal(floats.blocks[0].attn.qkv.weight, rounded if flip else rounded.T)
    kept = load_pretrained(tmp_path / "q")
    blocks = [m for m in kept.blocks.modules() if isinstance(m, QuantLinear)]
    assert len(blocks) == 8
    assert all(m.kernel_packed == (flip and int4pack_layout() is not None) for m in blocks)
    with torch.no_grad():
        ref, got = floats(IDS), kept(IDS)
    tolerance = 1e-2 if int4pack_layout() is not None else 1e-5  # bf16: the head's kernel
    assert (ref - got).abs().max() < tolerance * ref.abs().max()


@needs_kernel
def test_packing_in_chunks_of_rows_gives_the_same_bytes(monkeypatch) -> None:
    from lmforge.model import int4pack

    torch.manual_seed(0)
    codes, scale = quantize_weight(torch.randn(176, 64), 4, 32)  # 2 full 64-row blocks + 48
    whole = int4pack.pack(codes, scale, 32)
    monkeypatch.setattr(int4pack, "PACK_CHUNK_WEIGHTS", 64 * 64)  # chunks of 64 rows
    chunked = int4pack.pack(codes, scale, 32)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked, strict=True))
    rows = int4pack.dequantize(*chunked, 32, int4pack_layout(), 176)
    assert torch.equal(rows, dequantize_weight(codes, scale.bfloat16().float(), 4, 32))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_off_the_kernel_and_in_its_backward_the_weight_is_read_a_chunk_of_rows_at_a_time(
    monkeypatch, dtype
) -> None:
    from lmforge.model import int4pack

    torch.manual_seed(0)
    layer, _ = packed_linear(torch.randn(176, 64), 32)
    whole = layer.weight.to(dtype)

    def whole_weight(*args):
        raise AssertionError("a vocab-wide head would exist in floats whole")

    monkeypatch.setattr(int4pack, "dequantize", whole_weight)
    monkeypatch.setattr(int4pack, "PACK_CHUNK_WEIGHTS", 64 * 64)  # chunks of 64, 64, 48 rows
    x = torch.randn(2, 3, 64, dtype=dtype, requires_grad=True)  # float64: not the kernel
    y = layer(x)
    ref = F.linear(x, whole)
    tolerance = 1e-5 if dtype == torch.float64 else 1e-2  # the kernel's bf16 activations
    assert y.shape == (2, 3, 176) and (y - ref).abs().max() < tolerance * ref.abs().max()
    y.sum().backward()
    assert torch.allclose(x.grad, whole.sum(0).expand(2, 3, 64), atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_kept_int4_model_moved_to_another_dtype_still_runs(tmp_path: Path, dtype) -> None:
    model = load_pretrained(micro_int4(tmp_path))
    with torch.no_grad():
        ref = model(IDS)
        model.to(dtype)  # .float() / .half() / .bfloat16() after loading
        got = model(IDS)
    packed = [m for m in model.modules() if getattr(m, "kernel_packed", False)]
    assert packed and all(m.scales_and_zeros.dtype == torch.bfloat16 for m in packed)
    assert model.lm_head.scales_and_zeros is model.tok_emb.scales_and_zeros  # still tied
    assert model.tok_emb(IDS).dtype == dtype and got.dtype == dtype
    assert (got.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_a_torch_without_is_exporting_still_runs_the_kernels(monkeypatch) -> None:
    torch.manual_seed(0)
    layers = {"aten::_weight_int8pack_mm": QuantLinear.from_linear(torch.nn.Linear(64, 64), "int8")}
    if int4pack_layout() is not None:
        layers["aten::_weight_int4pack_mm_for_cpu"] = packed_linear(torch.randn(64, 64), 32)[0]
    x = torch.randn(2, 64)
    # torch.compiler.is_exporting came after some torch versions lmforge takes (>= 2.6); this
    # torch's own first import of torch._dynamo reads it, so that import is done before
    importlib.import_module("torch._dynamo")
    monkeypatch.delattr(torch.compiler, "is_exporting")
    for kernel, layer in layers.items():
        with torch.no_grad(), torch.profiler.profile() as prof:
            got = layer(x)
        ref = F.linear(x, layer.weight, layer.bias)
        assert (got - ref).abs().max() < 1e-2 * ref.abs().max()
        ran = any(e.name == kernel for e in prof.events())
        assert ran == (kernel.endswith("for_cpu") or quant.int8_kernel_available())


@needs_kernel
def test_an_empty_lookup_or_batch_gives_empty_outputs(tmp_path: Path) -> None:
    model = load_pretrained(micro_int4(tmp_path))
    empty = torch.zeros(2, 0, dtype=torch.long)
    with torch.no_grad():
        assert model.tok_emb(empty).shape == (2, 0, model.config.n_embd)
        assert model.lm_head(torch.randn(0, model.config.n_embd)).shape == (0, 256)


@needs_kernel
def test_a_head_of_rows_the_kernel_lacks_is_padded_with_zero_rows() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 96)
    head, scale = packed_linear(w[:50], 32)  # 50 rows: packed as 64, 14 of them zero
    full, _ = packed_linear(w, 32)
    assert head.kernel_packed and head.int4pack.shape == (64, 48)
    assert head.scales_and_zeros.shape == (3, 64, 2)
    codes = quantize_weight(w[:50], 4, 32)[0]
    bf16 = dequantize_weight(codes, scale.bfloat16().float(), 4, 32)
    assert torch.equal(head.weight, bf16)  # (50, 96): the padding never reads back
    x = torch.randn(2, 7, 96)
    with torch.no_grad(), torch.profiler.profile() as prof:
        got = head(x)
    assert any(e.name == "aten::_weight_int4pack_mm_for_cpu" for e in prof.events())
    with torch.no_grad():  # each output row is its own: the padding changes none of them
        assert got.shape == (2, 7, 50) and torch.equal(got, full(x)[..., :50])
    ours = F.linear(x, dequantize_weight(codes, scale, 4, 32))  # the dequantize path
    assert (got - ours).abs().max() < 1e-2 * ours.abs().max()


@needs_kernel
def test_a_vocabulary_the_kernel_lacks_runs_it_and_only_matmuls_are_packed(tmp_path) -> None:
    # GPT-2 style: a tied 250-token table (not a multiple of 16) and an untied position table
    model = load_pretrained(micro_int4(tmp_path, "micro-gpt2", vocab_size=250))
    assert model.lm_head.kernel_packed and model.lm_head.int4pack.shape[0] == 256
    assert model.tok_emb.int4pack is model.lm_head.int4pack  # tied: the head's bytes, once
    pos = model.pos_emb  # a lookup only: our layout, fp32 scales, no repacking
    assert isinstance(pos, QuantEmbedding) and not pos.kernel_packed
    assert pos.scale.dtype == torch.float32 and not hasattr(pos, "int4pack")
    assert not in_file_mapping(model, tmp_path / "q" / "model.safetensors")  # copied out of it
    floats = load_pretrained(tmp_path / "q", quantized="dequantize")
    positions = torch.arange(0, 128, 5)
    assert torch.equal(pos(positions), floats.pos_emb(positions))  # exactly: no bf16 scales
    assert quant.quantized_numel(model) == sum(
        p.numel() for n, p in floats.named_parameters() if p.dim() == 2 and n != "lm_head.weight"
    )  # the padding rows count for nothing
    with torch.no_grad(), torch.profiler.profile() as prof:
        got = model(IDS)
    calls = [e for e in prof.events() if e.name == "aten::_weight_int4pack_mm_for_cpu"]
    assert len(calls) == 9  # 4 linears x 2 blocks and the head
    with torch.no_grad():
        ref = floats(IDS)
    assert got.shape == (1, 29, 250) and (got - ref).abs().max() < 1e-2 * ref.abs().max()


@needs_kernel
def test_an_untied_token_table_keeps_our_layout_and_its_head_the_kernels(tmp_path) -> None:
    model = load_pretrained(micro_int4(tmp_path, tie_embeddings=False))
    assert model.lm_head.kernel_packed and not model.tok_emb.kernel_packed
    floats = load_pretrained(tmp_path / "q", quantized="dequantize")
    assert torch.equal(model.tok_emb(IDS), floats.tok_emb(IDS))


@needs_kernel
def test_a_state_dict_holds_our_codes_not_the_kernels_bytes() -> None:
    # the kernel's bytes differ with the CPU; ours (and bf16 scales) load on any machine
    torch.manual_seed(0)
    w = torch.randn(50, 96)  # packed as 64 rows: the padding stays out of the state dict
    layer, scale = packed_linear(w, 32)
    state = layer.state_dict()
    codes = quantize_weight(w, 4, 32)[0]
    assert state.keys() == {"codes", "scale"}
    assert torch.equal(state["codes"], codes)
    assert torch.equal(state["scale"], scale.bfloat16().float())
    ours = QuantLinear(96, 50, 4, 32)  # our layout, as where the kernel is missing
    ours.load_state_dict(state)
    assert torch.equal(ours.weight, layer.weight)
    again = QuantLinear(96, 50, 4, 32, kernel_packed=True)  # repacked at load, fp32 scales too
    again.load_state_dict({"codes": codes, "scale": scale})
    assert torch.equal(again.int4pack, layer.int4pack)
    assert torch.equal(again.scales_and_zeros, layer.scales_and_zeros)
    with pytest.raises(RuntimeError, match=r"size mismatch for codes / scale.*\(50, 48\)"):
        QuantLinear(96, 50, 4, 32, kernel_packed=True).load_state_dict(
            {"codes": codes[:40], "scale": scale[:40]}
        )


@needs_kernel
def test_a_kept_tied_tables_state_dict_is_in_our_layout_and_loads_back(tmp_path: Path) -> None:
    model = load_pretrained(micro_int4(tmp_path, "micro-gpt2", vocab_size=250))
    state = model.state_dict()
    assert not [k for k in state if k.endswith(("int4pack", "scales_and_zeros"))]
    assert state["tok_emb.codes"].shape == (250, 32)  # not the kernel's 256 rows
    again = load_pretrained(tmp_path / "q")
    with torch.no_grad():
        for m in again.modules():
            if getattr(m, "kernel_packed", False):
                m.int4pack.zero_()
        again.load_state_dict(state)
        assert torch.equal(again(IDS), model(IDS))


@needs_kernel
def test_a_lookup_past_the_table_raises_rather_than_read_the_padding_rows(tmp_path) -> None:
    model = load_pretrained(micro_int4(tmp_path, "micro-gpt2", vocab_size=250))
    table = model.tok_emb  # 250 rows, packed as 256 with the head's
    assert table.kernel_packed and table.int4pack.shape[0] == 256
    with torch.no_grad():
        assert table(torch.tensor([249])).abs().sum() > 0
        with pytest.raises(IndexError, match="token id 252 is out of range"):
            table(torch.tensor([3, 252]))  # a padding row: zeros, were it read


@needs_kernel
def test_a_bf16_inputs_gradient_is_summed_in_float32_over_the_weights_chunks(monkeypatch) -> None:
    from lmforge.model import int4pack

    monkeypatch.setattr(int4pack, "PACK_CHUNK_WEIGHTS", 64 * 64)  # 32 chunks of 64 rows
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 2048, bias=False), "int4", 32)
    x = torch.randn(8, 64, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    exact = grad.double() @ layer.weight.double()
    # bf16 partial sums were off by 1.3% of the largest entry here; one rounding, 0.26%
    assert x.grad.dtype == torch.bfloat16
    assert (x.grad.double() - exact).abs().max() < 2**-8 * exact.abs().max()
