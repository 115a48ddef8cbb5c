"""GGUF export of a qk_norm model as llama.cpp's qwen3: q/k in rotate-halves order, their norms.

Checked by reading the file back (gguf's reader); the `integration` test also runs a trained
qk_norm model's file in llama.cpp (benchmarks/check_gguf_llamacpp.py), skipped whenever
`llama_cpp` cannot be imported, as in tests/unit/compress/test_gguf.py."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.compress.gguf_export import check_gguf, export_gguf, gguf_arch
from lmforge.errors import ConfigError, StageError
from lmforge.model.config import preset_config
from lmforge.model.convert import load_pretrained, save_pretrained
from lmforge.model.transformer import Transformer
from unit.compress.llama_cpp_run import assert_llama_cpp_runs_like_lmforge
from unit.compress.test_gguf import lmforge_tokenizer, read_fields

gguf = pytest.importorskip("gguf")


def qwen3_dir(tmp_path) -> Transformer:
    """A qk_norm model (head_dim 24, not n_embd / n_head) saved with a tokenizer to tmp_path/m."""
    tok = lmforge_tokenizer(tmp_path)
    cfg = preset_config("micro", vocab_size=tok.get_vocab_size(), qk_norm=True, head_dim=24)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # gains away from 1, so a swapped or missing norm shows
        for block in model.blocks:
            block.attn.q_norm.weight.uniform_(0.5, 1.5)
            block.attn.k_norm.weight.uniform_(0.5, 1.5)
    save_pretrained(model, tmp_path / "m")
    tok.save(str(tmp_path / "m" / "tokenizer.json"))
    return load_pretrained(tmp_path / "m")


def test_qk_norm_model_exports_as_llama_cpp_qwen3(tmp_path) -> None:
    model = qwen3_dir(tmp_path)
    export_gguf(model, tmp_path / "m", tmp_path / "m.gguf", {}, "f32")
    assert check_gguf(tmp_path / "m.gguf", model, tmp_path / "m", {})["tensors"] == 2 + 11 * 2
    fields = read_fields(tmp_path / "m.gguf")
    assert fields["general.architecture"] == "qwen3"
    assert fields["qwen3.attention.key_length"] == fields["qwen3.rope.dimension_count"] == 24
    tensors = {
        t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors
    }
    attn = model.blocks[1].attn
    q_rows = attn.qkv.weight[: 4 * 24].detach().numpy()  # llama.cpp's qwen3 rotates halves too
    assert np.array_equal(tensors["blk.1.attn_q.weight"], q_rows)
    for x in "qk":
        norm = getattr(attn, f"{x}_norm").weight.detach().numpy()
        assert np.array_equal(tensors[f"blk.1.attn_{x}_norm.weight"], norm)


def test_gguf_refuses_a_qk_norm_model_llama_cpp_has_no_architecture_for() -> None:
    with pytest.raises(ConfigError, match=r"as qwen3: attn_bias=True \(needs False\)"):
        gguf_arch(preset_config("micro", qk_norm=True, attn_bias=True))
    assert gguf_arch(preset_config("micro")) == "llama"  # qk_norm off: llama, as before


def test_read_back_catches_a_head_width_llama_cpp_would_misread(tmp_path, monkeypatch) -> None:
    """Tensors alone cannot tell key_length 24 from 32 (the rows are the same bytes); the
    read-back must check the hyperparameters llama.cpp shapes attention by."""
    model = qwen3_dir(tmp_path)
    written = gguf.GGUFWriter.add_key_length
    monkeypatch.setattr(gguf.GGUFWriter, "add_key_length", lambda w, n: written(w, n + 8))
    export_gguf(model, tmp_path / "m", tmp_path / "m.gguf", {}, "f32")
    with pytest.raises(StageError, match=r"key_length is not what was written \(32, expected 24\)"):
        check_gguf(tmp_path / "m.gguf", model, tmp_path / "m", {})


@pytest.mark.integration
def test_llama_cpp_runs_a_qk_norm_gguf_like_lmforge(trained_dir: Path, tmp_path: Path) -> None:
    """A trained micro model given q/k norm gains away from 1, exported as qwen3 and run in
    llama.cpp: logits and greedy tokens as lmforge's. Needs llama-cpp-python (skipped without)."""
    trained = load_pretrained(trained_dir)
    model = Transformer(replace(trained.config, qk_norm=True)).eval()
    model.load_state_dict(trained.state_dict(), strict=False)  # all but the new norms
    torch.manual_seed(0)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.q_norm.weight.uniform_(0.5, 1.5)
            block.attn.k_norm.weight.uniform_(0.5, 1.5)
    model_dir = assert_llama_cpp_runs_like_lmforge(model, trained_dir, tmp_path)
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "qwen3"
