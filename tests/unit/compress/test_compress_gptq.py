"""GPTQ: the math on one Linear (beats RTN, is RTN when H = I, act-order, dead inputs) and the
stage (calibrates on tokens or data, writes a checkpoint that loads, refuses without data)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.compress.calibrated import gptq_blocks
from lmforge.compress.calibration import block_linears, text_calibration, token_windows
from lmforge.compress.gptq import Grid, gptq_weight, round_to_grid, static_scales
from lmforge.compress.quantize import calibrated_rounding, quantize_dir
from lmforge.compress.stage import CompressConfig, QuantizeSettings, compress
from lmforge.errors import ConfigError, InputError
from lmforge.evals.lm import EvalModel, GenerationSettings
from lmforge.evals.report_sections.compress import compression_rows
from lmforge.model.convert import load_pretrained
from lmforge.model.quant_rounding import absmax_scale, dequantize_weight, quantize_weight
from unit.compress.test_prune import write_tokens
from unit.evals.helpers import CORPUS, make_model_dir, write_split


def correlated_problem(seed: int, n: int = 512, d_in: int = 128, d_out: int = 48):
    """Inputs X (n, d_in) with correlated features (a random mixing), a weight, H = 2 X^T X / n."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen) @ torch.randn(d_in, d_in, generator=gen) / d_in**0.5
    w = torch.randn(d_out, d_in, generator=gen)
    return x, w, 2 * x.T @ x / n


def output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return (x @ w.T - x @ q.T).norm().item()


def rtn(w: torch.Tensor, bits: int, group_size: int = 32) -> torch.Tensor:
    return dequantize_weight(*quantize_weight(w, bits, group_size), bits, group_size)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("grid", [Grid(4, "group", 32), Grid(8, "row")], ids=["int4g32", "int8"])
def test_gptq_has_lower_output_error_than_rtn(seed: int, grid: Grid) -> None:
    x, w, h = correlated_problem(seed)
    q, scale = gptq_weight(w, h, grid)
    ref = rtn(w, grid.bits)
    assert output_error(x, w, q) < 0.8 * output_error(x, w, ref)
    assert torch.equal(q, torch.round(q / scale) * scale)  # on the grid: codes x scales
    lo, hi = {4: (-8, 7), 8: (-127, 127)}[grid.bits]  # the codes RTN's checkpoint stores
    assert lo <= torch.round(q / scale).min() and torch.round(q / scale).max() <= hi


@pytest.mark.parametrize("grid", [Grid(4, "group", 32), Grid(8, "row"), Grid(8, "column")])
def test_gptq_with_identity_hessian_is_rtn_exactly(grid: Grid) -> None:
    _, w, _ = correlated_problem(3)
    q, _ = gptq_weight(w, torch.eye(w.shape[1]), grid)
    # a column-scaled int8 weight is what RTN writes for a checkpoint storing it transposed
    expected = rtn(w.T, 8).T if grid.axis == "column" else rtn(w, grid.bits)
    assert torch.equal(q, expected)


def naive_gptq(w: torch.Tensor, h: torch.Tensor, grid: Grid, act_order: bool) -> torch.Tensor:
    """The paper's algorithm without lazy batches: after each column, every later column takes
    its error through the row of the upper Cholesky factor of H^-1 (float64)."""
    w, h = w.double().clone(), h.double()
    n, g = w.shape[1], grid.group_size
    static = static_scales(w, grid) if grid.axis == "row" or act_order else None
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(n)
    w, h = w[:, perm], h[perm][:, perm]
    h = h + 0.01 * torch.diag(h).mean() * torch.eye(n, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for i in range(n):
        if static is not None:
            scale = static[:, perm[i]]
        elif i % g == 0:  # a group's scale from its columns as they are when it is reached
            scale = absmax_scale(w[:, i : i + g], grid.bits)[:, 0]
        q[:, i] = round_to_grid(w[:, i], scale, grid.bits)
        err = (w[:, i] - q[:, i]) / u[i, i]
        w[:, i:] -= err[:, None] * u[i, i:][None, :]
    return q[:, torch.argsort(perm)].float()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("grid", [Grid(4, "group", 32), Grid(8, "row")], ids=["int4g32", "int8"])
def test_lazy_batches_compute_what_the_column_by_column_algorithm_does(
    grid: Grid, act_order: bool
) -> None:
    x, w, _ = correlated_problem(6, d_in=320)  # 3 lazy blocks of 128, the last one short
    x = x * torch.linspace(0.2, 3, x.shape[1])
    h = 2 * x.T @ x / x.shape[0]
    q, _ = gptq_weight(w, h, grid, act_order=act_order)
    ref = naive_gptq(w, h, grid, act_order)
    same = torch.isclose(q, ref, rtol=1e-4, atol=1e-6).float().mean()
    assert same > 0.995  # float32 vs float64: a rare tie rounds apart
    assert output_error(x, w, q) == pytest.approx(output_error(x, w, ref), rel=0.01)


def test_act_order_keeps_contiguous_groups_and_still_beats_rtn() -> None:
    x, w, _ = correlated_problem(4)
    x = x * torch.linspace(0.2, 3, x.shape[1])  # inputs of unequal size: act-order's case
    h = 2 * x.T @ x / x.shape[0]
    q, scale = gptq_weight(w, h, Grid(4, "group", 32), act_order=True)
    groups = scale.reshape(w.shape[0], -1, 32)
    assert torch.equal(groups, groups[..., :1].expand_as(groups))  # one scale a group of 32
    static = w.reshape(w.shape[0], -1, 32).abs().amax(-1, keepdim=True) / 7
    assert torch.allclose(groups[..., :1], static)  # computed from the unrounded weight
    assert output_error(x, w, q) < 0.8 * output_error(x, w, rtn(w, 4))


def test_dead_inputs_get_zero_weights_and_no_nans() -> None:
    x, w, _ = correlated_problem(5)
    x[:, 7] = 0  # an input that never fires: H_77 = 0
    q, _ = gptq_weight(w, 2 * x.T @ x / x.shape[0], Grid(4, "group", 32))
    assert torch.isfinite(q).all() and (q[:, 7] == 0).all()


def test_a_hessian_cholesky_cannot_factor_is_refused_naming_the_weight_and_the_flag() -> None:
    from lmforge.model.config import preset_config
    from lmforge.model.transformer import Transformer

    model = Transformer(preset_config("micro", vocab_size=256)).eval()
    ids = torch.randint(0, 256, (2, 8))
    with pytest.raises(ConfigError, match=r"blocks\.0\.attn\.qkv\.weight: .*damp_percent"):
        gptq_blocks(model, ids, lambda _: Grid(8, "row"), -2.0, False)  # H - 2 mean(diag) I


def test_calibration_windows_follow_the_seed_and_encode_only_what_they_need() -> None:
    encoded: list[str] = []

    def encode(text: str) -> list[int]:
        encoded.append(text)
        return [ord(c) % 200 for c in text]

    a, b, c = (text_calibration(CORPUS, encode, 0, 4, 16, seed, "corpus") for seed in (0, 0, 1))
    assert a.shape == (4, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert len(encoded) < 3 * len(CORPUS)  # 4 x 4 x 16 tokens are read before the end
    with pytest.raises(InputError, match="fewer than one calibration window of 500"):
        text_calibration(CORPUS[:1], encode, 0, 4, 500, 0, "corpus")


def test_calibration_windows_are_distinct_non_overlapping_and_all_of_a_short_stream() -> None:
    stream = np.arange(1000)
    ids = token_windows(stream, 20, 16, 0, "stream")
    starts = ids[:, 0]
    assert ids.shape == (20, 16) and len(set(starts.tolist())) == 20  # no window twice
    assert (starts % 16 == 0).all() and torch.equal(ids, starts[:, None] + torch.arange(16))
    assert token_windows(stream[:50], 20, 16, 0, "stream").tolist() == [
        list(range(s, s + 16)) for s in (0, 16, 32)
    ]  # 3 windows fit: all of them


@pytest.mark.parametrize(
    ("preset", "scheme"), [("micro", "int4"), ("micro-gpt2", "int4"), ("micro-gpt2", "int8")]
)
def test_the_checkpoint_holds_exactly_the_rounded_weights_gptq_computed(
    preset: str, scheme: str, tmp_path: Path
) -> None:
    """Llama's fused q/k/v (grouped kv) and gate/up split back, GPT-2's transposed Conv1D
    (int4 flipped, int8 a scale per input column): the loaded weights are GPTQ's."""
    src = make_model_dir(tmp_path / "src", preset=preset)
    ids = torch.randint(0, 250, (8, 32), generator=torch.Generator().manual_seed(0))
    settings = QuantizeSettings(method="gptq")
    quant = quantize_dir(src, tmp_path / "q", scheme, 32, calibrated_rounding(ids, settings, LOG))
    assert set(quant["bits"].values()) == {4 if scheme == "int4" else 8}
    original, rounded = load_pretrained(src), load_pretrained(src)
    gptq_blocks(rounded, ids, lambda n: _grid(n, preset, scheme), 0.01, False)
    loaded = load_pretrained(tmp_path / "q", quantized="dequantize")
    for i, block in enumerate(loaded.blocks):
        for name, linear in block_linears(block).items():
            ours = block_linears(rounded.blocks[i])[name].weight
            assert torch.allclose(linear.weight, ours, atol=1e-6), name
            assert not torch.equal(ours, rtn_of(original, i, name, scheme)), name
    with torch.no_grad():
        assert torch.isfinite(load_pretrained(tmp_path / "q")(ids)).all()


LOG = logging.getLogger(__name__)


def _grid(name: str, preset: str, scheme: str) -> Grid:
    if scheme == "int4":
        return Grid(4, "group", 32)
    return Grid(8, "column" if preset == "micro-gpt2" else "row")


def rtn_of(model: torch.nn.Module, block: int, name: str, scheme: str) -> torch.Tensor:
    w = model.blocks[block].get_submodule(name).weight.detach()
    return rtn(w, 4 if scheme == "int4" else 8)


def test_gptq_stage_on_tokens_writes_a_model_that_loads_and_generates(
    trained_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    tokens = write_tokens(trained_dir, tmp_path / "tokens")
    quantize = {"scheme": "int4", "method": "gptq", "calibration_samples": 16,
                "calibration_seq_len": 32}  # fmt: skip
    out = compress(CompressConfig(method="quantize", model=trained_dir, data=data_dir,
                                  tokens=tokens, quantize=quantize, out=tmp_path / "g"))  # fmt: skip
    report = json.loads((out / "compression.json").read_text())
    q = report["quantization"]
    assert q["method"] == "gptq" and q["int4_tensors"] > 0 and q["seconds"] > 0
    assert q["calibration"] == {"source": f"{tokens}/train.bin", "samples": 16, "seq_len": 32,
                                "seed": 0, "damp_percent": 0.01, "desc_act": False}  # fmt: skip
    assert report["after"]["perplexity"] > 0 and report["size_ratio"] < 0.3
    assert compression_rows(report)[1]["variant"] == "int4 weight-only, GPTQ on 16 x 32 tokens"
    text = EvalModel.load(out / "final").generate("def", GenerationSettings(max_new_tokens=5))
    assert isinstance(text, str)


def test_cli_method_and_tokens_flags_run_gptq_on_the_shards(
    trained_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from lmforge.cli import app

    tokens = write_tokens(trained_dir, tmp_path / "tokens")
    out = tmp_path / "g"
    args = ["compress", "quantize", "--model", str(trained_dir), "--data", str(data_dir),
            "--out", str(out), "--scheme", "int4", "--method", "gptq", "--tokens", str(tokens),
            "--set", "quantize.calibration_samples=4", "--set", "quantize.calibration_seq_len=16",
            "--set", "speed.new_tokens=2"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    q = json.loads((out / "compression.json").read_text())["quantization"]
    assert q["method"] == "gptq" and q["calibration"]["source"] == f"{tokens}/train.bin"


def test_gptq_stage_calibrates_on_a_data_split(trained_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_split(data, "train", CORPUS * 4)
    write_split(data, "val", CORPUS)
    quantize = {"scheme": "int8", "method": "gptq", "calibration_samples": 8,
                "calibration_seq_len": 24, "desc_act": True}  # fmt: skip
    out = compress(CompressConfig(method="quantize", model=trained_dir, data=data,
                                  quantize=quantize, out=tmp_path / "g"))  # fmt: skip
    report = json.loads((out / "compression.json").read_text())
    assert report["quantization"]["calibration"]["source"] == f"{data} split train"
    assert abs(report["perplexity_delta_pct"]) < 2.0  # int8 keeps quality


def test_gptq_without_calibration_data_is_refused_naming_the_flags(
    trained_dir: Path, tmp_path: Path
) -> None:
    cfg = CompressConfig(method="quantize", model=trained_dir, out=tmp_path / "g",
                         quantize={"method": "gptq"})  # fmt: skip
    with pytest.raises(ConfigError, match=r"--tokens DIR.*--data DIR.*--method rtn"):
        compress(cfg)
    assert not (tmp_path / "g" / "final").exists()


@pytest.mark.parametrize("kind", ["encoder", "encoder-decoder"])
def test_calibrated_methods_refuse_what_has_no_decoder_blocks(
    kind: str, data_dir: Path, tmp_path: Path
) -> None:
    import shutil

    from lmforge.model.config import preset_config
    from lmforge.model.convert import save_pretrained
    from lmforge.model.seq2seq import Seq2SeqLM
    from unit.finetune.encoder_tokenizers import bert_tokenizer_dir
    from unit.finetune.helpers import make_model_dir as make_encoder_dir

    tok = bert_tokenizer_dir(tmp_path / "tok")
    if kind == "encoder":
        model = make_encoder_dir(tmp_path / "m", tok, "bert-micro")
    else:
        model = tmp_path / "m"
        save_pretrained(Seq2SeqLM(preset_config("bart-micro")), model)
        shutil.copy(tok / "tokenizer.json", model / "tokenizer.json")
    cfg = CompressConfig(method="quantize", model=model, data=data_dir, out=tmp_path / "g",
                         quantize={"method": "awq"})  # fmt: skip
    with pytest.raises(ConfigError, match=rf"is an {kind}: calibrated .*quantize.method=rtn"):
        compress(cfg)
