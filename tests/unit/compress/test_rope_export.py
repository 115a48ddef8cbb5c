"""Exports of a rope-scaled model: ONNX (the scaled tables are buffers in the graph) and GGUF
(llama.cpp's rope.scaling.* keys for linear and YaRN, refusals for what llama.cpp cannot do).

The `integration` test runs the GGUF in llama.cpp (llama_cpp_run.py: benchmarks/
check_gguf_llamacpp.py); it is skipped whenever `llama_cpp` cannot be imported, as in
tests/unit/compress/test_gguf.py.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.compress.gguf_export import check_gguf, export_gguf, gguf_arch
from lmforge.compress.onnx_export import check_onnx, export_onnx, ort_session
from lmforge.errors import ConfigError
from lmforge.model.config import preset_config
from lmforge.model.convert import load_pretrained
from lmforge.model.rope import ORIGINAL
from lmforge.model.transformer import Transformer
from unit.compress.llama_cpp_run import assert_llama_cpp_runs_like_lmforge

gguf = pytest.importorskip("gguf")

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}


def rescaled(model_dir: Path, scaling: dict) -> Transformer:
    """model_dir's model with its weights under another rope_scaling."""
    model = load_pretrained(model_dir)
    scaled = Transformer(replace(model.config, rope_scaling=scaling)).eval()
    scaled.load_state_dict(model.state_dict())
    return scaled


def test_onnx_export_of_a_yarn_model_matches_pytorch_past_the_original_context(tmp_path: Path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    cfg = preset_config("micro", rope_scaling=YARN | {"original_max_position_embeddings": 4})
    model = Transformer(cfg).eval()
    export_onnx(model, tmp_path / "m.onnx")
    diffs = check_onnx(model, ort_session(tmp_path / "m.onnx"), atol=1e-4)
    assert diffs["prefill_max_abs_diff"] < 1e-4 and diffs["decode_max_abs_diff"] < 1e-4


@pytest.mark.parametrize(
    "scaling, keys",
    [
        ({"rope_type": "linear", "factor": 2.0}, {"type": "linear", "factor": 2.0}),
        (YARN | {"beta_fast": 32, "truncate": True},  # the defaults, said explicitly
         {"type": "yarn", "factor": 4.0, "original_context_length": 16}),
        (YARN | {"mscale": 1.0, "attention_factor": None},  # attention factor still the default
         {"type": "yarn", "factor": 4.0, "original_context_length": 16}),
    ],
)  # fmt: skip
def test_gguf_writes_llama_cpp_rope_scaling_keys(trained_dir: Path, tmp_path: Path, scaling, keys):
    model = rescaled(trained_dir, scaling)
    special = {"bos_token_id": 0, "eos_token_id": 1}
    export_gguf(model, trained_dir, tmp_path / "m.gguf", special)
    check_gguf(tmp_path / "m.gguf", model, trained_dir, special)  # reads the keys back too
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    written = {
        k.removeprefix("llama.rope.scaling."): f.contents()
        for k, f in reader.fields.items()
        if k.startswith("llama.rope.scaling.")
    }
    assert written == keys
    assert reader.fields["llama.rope.freq_base"].contents() == np.float32(model.config.rope_theta)


@pytest.mark.parametrize(
    "scaling, message",
    [
        (YARN | {"attention_factor": 0.8},
         "llama.cpp's YaRN does not take attention_factor from a GGUF file"),
        (YARN | {"mscale": 1.0, "mscale_all_dim": 1.0},
         "llama.cpp's YaRN does not take mscale, mscale_all_dim from a GGUF file"),
        (YARN | {"beta_fast": 16, "beta_slow": 1}, "does not take beta_fast from a GGUF file"),
        (YARN | {"truncate": False}, r"llama.cpp's YaRN always rounds the ramp's ends outward"),
        (YARN | {"factor": 0.5}, r"and needs factor >= 1"),
        ({"rope_type": "dynamic", "factor": 2.0}, "llama.cpp has no dynamic scaling"),
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}, "reads it from a rope_freqs tensor"),
    ],
)  # fmt: skip
def test_gguf_refuses_rope_scaling_llama_cpp_cannot_reproduce(scaling, message):
    with pytest.raises(ConfigError, match=f"cannot express model.rope_scaling .*{message}"):
        gguf_arch(preset_config("micro", rope_scaling=scaling))


@pytest.mark.integration
@pytest.mark.parametrize(
    "scaling",
    [{"rope_type": "linear", "factor": 2.0}, YARN | {"factor": 8.0, ORIGINAL: 32}],
    ids=["linear", "yarn"],
)
def test_llama_cpp_runs_the_rope_scaled_gguf_like_lmforge(trained_dir: Path, tmp_path, scaling):
    """Needs llama-cpp-python (skipped without it, see the module docstring)."""
    assert_llama_cpp_runs_like_lmforge(rescaled(trained_dir, scaling), trained_dir, tmp_path)
