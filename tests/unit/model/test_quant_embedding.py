"""Quantized embedding tables: ids outside the table refused, a tied int4 table and LM head
saved once and reloaded tied (under torch.inference_mode too; each state dict from the bytes as
they are then), a tied table's weights counted once."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lmforge.compress.quantize import quantize_dir
from lmforge.model import int4pack
from lmforge.model.convert import load_pretrained
from lmforge.model.quant import quantized_numel
from lmforge.model.quant_embedding import QuantEmbedding
from lmforge.model.quant_module import QuantModule
from lmforge.model.quant_rounding import dequantize_weight, quantize_weight
from lmforge.train.checkpoint import load_weights, save_weights
from unit.evals.helpers import make_model_dir

LAYOUTS = [
    "int8",
    "int4",
    pytest.param(
        "int4-kernel",
        marks=pytest.mark.skipif(
            int4pack.int4pack_layout() is None, reason="this torch has no CPU int4 kernel"
        ),
    ),
]


def quantized_table(layout: str) -> tuple[nn.Embedding, QuantEmbedding, torch.Tensor]:
    """A 64 x 64 nn.Embedding, its QuantEmbedding in `layout` and the dequantized table."""
    torch.manual_seed(0)
    emb = nn.Embedding(64, 64)
    bits, packed = (8, False) if layout == "int8" else (4, layout == "int4-kernel")
    codes, scale = quantize_weight(emb.weight.detach(), bits, 32)
    table = QuantEmbedding(64, 64, bits, 32, kernel_packed=packed)
    if packed:
        table.int4pack, table.scales_and_zeros = int4pack.pack(codes, scale, 32)
    else:
        table.codes, table.scale = codes, scale
    return emb, table, dequantize_weight(codes, scale, bits, 32)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bad", [-1, -64, 64])
def test_an_id_outside_a_quantized_table_is_refused_like_nn_embedding(layout, bad) -> None:
    emb, table, weight = quantized_table(layout)
    ids = torch.tensor([[3, 5], [bad, 7]])
    with pytest.raises(IndexError):  # what torch's own table does
        emb(ids)
    with pytest.raises(IndexError, match=rf"token id {bad} is out of range .* 64 rows"):
        table(ids)
    ok = torch.tensor([[0, 63], [5, 7]])  # the edges are in range and read their own rows
    assert torch.allclose(table(ok), weight[ok], atol=1e-2 if layout == "int4-kernel" else 0)


def test_a_kept_quantized_model_refuses_a_negative_token_id(tmp_path: Path) -> None:
    src = make_model_dir(tmp_path / "fp32")
    quantize_dir(src, tmp_path / "int4", "int4", 32)
    model = load_pretrained(tmp_path / "int4")
    assert isinstance(model.tok_emb, QuantEmbedding)
    with pytest.raises(IndexError, match="token id -1 is out of range"):
        model(torch.tensor([[5, -1, 6]]))


def assert_head_saved_as_aliases(model: nn.Module, tmp_path: Path) -> None:
    """model saved (save_weights as tied.safetensors) stores its tied head's names as aliases of
    the table's tensors, not a second copy of its bytes."""
    state = model.state_dict()
    save_weights(state, tmp_path / "tied.safetensors")
    untied = {k: v for k, v in state.items() if not k.startswith("lm_head.")}
    save_weights(untied, tmp_path / "one_copy.safetensors")
    table = state["tok_emb.codes"].nbytes + state["tok_emb.scale"].nbytes
    extra = (tmp_path / "tied.safetensors").stat().st_size
    extra -= (tmp_path / "one_copy.safetensors").stat().st_size
    assert table > 5000 and 0 <= extra < 200  # the head's names as aliases, not its bytes


def test_a_tied_int4_table_and_head_are_saved_once_and_reload_tied(tmp_path: Path) -> None:
    src = make_model_dir(tmp_path / "fp32")  # the micro preset ties its embeddings
    quantize_dir(src, tmp_path / "int4", "int4", 32)
    model = load_pretrained(tmp_path / "int4")
    assert model.tok_emb.stored_codes is model.lm_head.stored_codes
    assert_head_saved_as_aliases(model, tmp_path)

    reloaded = load_pretrained(tmp_path / "int4")
    reloaded.load_state_dict(load_weights(tmp_path / "tied.safetensors"), assign=True)
    assert reloaded.tok_emb.stored_codes is reloaded.lm_head.stored_codes
    scales = "scales_and_zeros" if model.tok_emb.kernel_packed else "scale"
    assert getattr(reloaded.tok_emb, scales) is getattr(reloaded.lm_head, scales)
    ids = torch.arange(1, 30)[None]
    with torch.no_grad():
        assert torch.equal(reloaded(ids), model(ids))


def test_a_kept_int4_model_made_under_inference_mode_saves_and_loads(tmp_path: Path) -> None:
    # inference tensors keep no version counter: the tied pair's reuse must not read one
    src = make_model_dir(tmp_path / "fp32")
    quantize_dir(src, tmp_path / "int4", "int4", 32)
    reference = load_pretrained(tmp_path / "int4")
    with torch.inference_mode():
        model = load_pretrained(tmp_path / "int4")
        state = model.state_dict()
    want = reference.state_dict()
    assert state.keys() == want.keys()
    assert all(torch.equal(state[k], want[k]) for k in want)
    ids = torch.arange(1, 30)[None]
    copied = load_pretrained(tmp_path / "int4")
    copied.load_state_dict(state)  # into normal tensors
    with torch.inference_mode():
        assigned = load_pretrained(tmp_path / "int4")
        assigned.load_state_dict(state, assign=True)  # torch assigns inference tensors only here
        for reloaded in (copied, assigned):
            assert torch.equal(reloaded(ids), reference(ids))


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("to", ["cpu", torch.float32, torch.bfloat16, "meta"])
def test_model_to_a_device_or_dtype_keeps_the_table_and_head_tied(tmp_path: Path, kind, to) -> None:
    # nn.Module._apply gives each module's buffer its own result; "meta" stands for a device move
    src = make_model_dir(tmp_path / "fp32")
    quantize_dir(src, tmp_path / kind, kind, 32)
    model = load_pretrained(tmp_path / kind).to(to)
    table, head = model.tok_emb, model.lm_head
    assert [n for n, _ in table.named_buffers()] == [n for n, _ in head.named_buffers()]
    for name, buffer in table.named_buffers():
        assert buffer is getattr(head, name), name
    if table.kernel_packed:  # moved, still the kernel's bf16
        assert table.scales_and_zeros.dtype == torch.bfloat16
    elif to == torch.bfloat16:
        assert table.scale.dtype == torch.bfloat16
    if to != "meta":
        assert_head_saved_as_aliases(model, tmp_path)
        with torch.no_grad():
            assert model(torch.arange(1, 9)[None]).isfinite().all()


def test_apply_with_a_function_that_takes_no_weak_reference_converts_as_nn_module(tmp_path):
    # torch.Tensor.double is a method descriptor: no memo can be keyed on it
    src = make_model_dir(tmp_path / "fp32")
    quantize_dir(src, tmp_path / "int8", "int8", 32)
    model = load_pretrained(tmp_path / "int8")._apply(torch.Tensor.double)
    assert model.tok_emb.scale.dtype == model.lm_head.scale.dtype == torch.float64


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_tied_table_assigned_from_torch_load_counts_once(tmp_path: Path, kind: str) -> None:
    src = make_model_dir(tmp_path / "fp32")
    quantize_dir(src, tmp_path / kind, kind, 32)
    model = load_pretrained(tmp_path / kind)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    reloaded = load_pretrained(tmp_path / kind)
    reloaded.load_state_dict(torch.load(buffer), assign=True)
    codes = (reloaded.tok_emb.stored_codes, reloaded.lm_head.stored_codes)
    assert codes[0].data_ptr() == codes[1].data_ptr()  # one table's bytes, maybe two tensors
    kept = [m for n, m in reloaded.named_modules() if isinstance(m, QuantModule) and n != "lm_head"]
    assert quantized_numel(reloaded) == sum(math.prod(m.weight_shape) for m in kept)


@pytest.mark.skipif(int4pack.int4pack_layout() is None, reason="this torch has no CPU int4 kernel")
def test_each_state_dict_unpacks_the_tables_bytes_as_they_are_now(tmp_path: Path) -> None:
    src = make_model_dir(tmp_path / "fp32")
    quantize_dir(src, tmp_path / "int4", "int4", 32)
    model = load_pretrained(tmp_path / "int4")
    first = model.state_dict()  # kept alive: its pair must not stand for the next state dict
    model.tok_emb.int4pack.data.fill_(int4pack.ZERO_CODES)  # a write no version counter sees
    second = model.state_dict()
    assert bool((second["tok_emb.codes"] == int4pack.ZERO_CODES).all())
    assert not torch.equal(first["tok_emb.codes"], second["tok_emb.codes"])
    assert second["tok_emb.codes"] is second["lm_head.codes"]  # the tied pair still saved once
