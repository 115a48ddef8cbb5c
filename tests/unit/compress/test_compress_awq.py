"""AWQ: folding the scales leaves the float model's logits unchanged, the searched scales round
better than RTN on outlier channels, and the stage writes a checkpoint that loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.compress.awq import clip_weight, fold_scales, scale_groups, search_scale
from lmforge.compress.gptq import Grid, round_nearest
from lmforge.compress.stage import CompressConfig, compress
from lmforge.errors import ConfigError
from lmforge.evals.lm import EvalModel, GenerationSettings
from lmforge.model.config import preset_config
from lmforge.model.convert import read_config, save_pretrained
from lmforge.model.transformer import Transformer
from unit.evals.helpers import CORPUS, write_split


@pytest.mark.parametrize(
    ("preset", "post_norm", "producers"),
    [
        ("micro", False, ["attn_norm", "mlp_norm", "attn.qkv", "mlp.fc"]),  # v -> o, up -> down
        ("micro-gpt2", False, ["attn_norm", "mlp_norm", "attn.qkv"]),  # GELU: no up -> down
        ("micro-gpt2", True, ["attn.qkv"]),  # post-norm: the norms feed no Linear
        ("micro", True, ["attn.qkv", "mlp.fc"]),
    ],
)
def test_folded_scales_leave_the_float_logits_unchanged(
    preset: str, post_norm: bool, producers: list[str]
) -> None:
    torch.manual_seed(0)
    cfg = preset_config(preset, vocab_size=256, n_kv_head=4, post_norm=post_norm)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref = model(ids)
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    for block in model.blocks:
        groups = scale_groups(block)
        assert [g.producer for g in groups] == producers
        for group in groups:
            width = block.get_submodule(group.consumers[0]).in_features
            fold_scales(block, group, torch.rand(width) * 4 + 0.25)
    with torch.no_grad():
        got = model(ids)
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(model.blocks[0].attn.qkv.weight, before)  # the weights did move


def test_grouped_query_attention_has_no_v_to_output_group() -> None:
    block = Transformer(preset_config("micro", vocab_size=256)).blocks[0]  # 4 heads, 2 kv
    assert [g.producer for g in scale_groups(block)] == ["attn_norm", "mlp_norm", "mlp.fc"]


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_an_encoder_in_our_own_layout_is_refused_calibration(method: str, tmp_path: Path):
    """The refusal reads the architecture (causal=False), not the model_type: an encoder no HF
    family represents is written as model_type lmforge and is still an encoder."""
    save_pretrained(Transformer(preset_config("micro", vocab_size=64, causal=False)), tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")  # refused before it is read
    assert read_config(tmp_path)["model_type"] == "lmforge"
    data = tmp_path / "data"
    write_split(data, "train", CORPUS)
    cfg = CompressConfig(method="quantize", model=tmp_path, data=data, out=tmp_path / "c",
                         quantize={"scheme": "int4", "method": method})  # fmt: skip
    with pytest.raises(ConfigError, match=r"is an encoder: calibrated quantization .* rtn"):
        compress(cfg)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_searched_scales_round_with_less_output_error_than_rtn(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 128, generator=gen)
    x[:, :4] *= 20  # a few outlier channels, as LLM activations have
    weights = [torch.randn(64, 128, generator=gen), torch.randn(32, 128, generator=gen)]
    grid = Grid(4, "group", 32)
    s, alpha = search_scale(x, weights, [grid, grid])
    err = lambda q, w: (x @ w.T - x @ q.T).norm().item()  # noqa: E731
    awq = sum(err(round_nearest(w * s, grid) / s, w) for w in weights)
    rtn = sum(err(round_nearest(w, grid), w) for w in weights)
    assert alpha > 0 and awq < 0.9 * rtn


@pytest.mark.parametrize("seed", [0, 1])
def test_clipping_the_groups_lowers_the_rounded_output_error(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, 128, generator=gen)
    w = torch.randn(96, 128, generator=gen)
    grid = Grid(4, "group", 32)
    clipped = clip_weight(w, x, grid)
    err = lambda q: (x @ w.T - x @ q.T).norm().item()  # noqa: E731
    assert err(round_nearest(clipped, grid)) < 0.98 * err(round_nearest(w, grid))  # ~5% here
    assert (clipped.abs() <= w.abs()).all() and not torch.equal(clipped, w)


def test_awq_stage_writes_a_model_that_loads_and_generates(trained_dir: Path, tmp_path: Path):
    data = tmp_path / "data"
    write_split(data, "train", CORPUS * 4)
    write_split(data, "val", CORPUS)
    quantize = {"scheme": "int4", "method": "awq", "calibration_samples": 8,
                "calibration_seq_len": 24, "awq_grid": 5}  # fmt: skip
    out = compress(CompressConfig(method="quantize", model=trained_dir, data=data,
                                  quantize=quantize, out=tmp_path / "a"))  # fmt: skip
    report = json.loads((out / "compression.json").read_text())
    q = report["quantization"]
    assert q["method"] == "awq" and q["int4_tensors"] > 0
    assert q["calibration"]["awq_grid"] == 5 and "damp_percent" not in q["calibration"]
    assert report["after"]["perplexity"] > 0 and report["size_ratio"] < 0.3
    text = EvalModel.load(out / "final").generate("def", GenerationSettings(max_new_tokens=5))
    assert isinstance(text, str)


@pytest.mark.parametrize("preset", ["micro", "micro-gpt2", "micro-moe"])
def test_folded_model_written_back_through_the_name_table_keeps_its_logits(
    preset: str, tmp_path: Path
) -> None:
    """scaled_tensors puts the folded norms and weights back under the checkpoint's names
    (GPT-2's transposed Conv1D and LayerNorm biases, Llama's fused q/k/v and gate/up, Mixtral's
    router and experts): a checkpoint written from them computes what the original does."""
    from safetensors.torch import save_file

    from lmforge.compress.calibrated import checkpoint_rules, scaled_tensors
    from lmforge.model.convert import load_pretrained, read_config, read_tensors
    from unit.evals.helpers import make_model_dir

    src = make_model_dir(tmp_path / "src", preset=preset)
    model, tensors = load_pretrained(src), read_tensors(src)
    torch.manual_seed(1)
    for block in model.blocks:
        for group in scale_groups(block):
            width = block.get_submodule(group.consumers[0]).in_features
            fold_scales(block, group, torch.rand(width) * 4 + 0.25)
    written = scaled_tensors(model, tensors, checkpoint_rules(read_config(src), set(tensors)))
    assert set(written) == set(tensors)
    norm = next(n for n in tensors if n.endswith(("ln_1.weight", "input_layernorm.weight")))
    assert not torch.equal(written[norm], tensors[norm])  # the attention norm took 1/s
    save_file(written, src / "model.safetensors")
    ids = torch.randint(0, 250, (2, 24))
    with torch.no_grad():
        assert torch.allclose(load_pretrained(src)(ids), model(ids), atol=1e-5, rtol=0)
