"""compress quantize: int8/int4 checkpoints that reload alone, quality kept, dynamic int8."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.compress.quantize import dynamic_int8, quantize_dir
from lmforge.compress.stage import CompressConfig, compress
from lmforge.errors import ConfigError, InputError
from lmforge.evals.lm import EvalModel, GenerationSettings
from lmforge.model.convert import load_pretrained
from lmforge.model.quant_checkpoint import dequantize_tensors, quantize_tensors


def test_quantize_tensors_round_trip_within_half_a_step() -> None:
    torch.manual_seed(0)
    tensors = {"w": torch.randn(8, 64), "odd": torch.randn(4, 30), "norm": torch.rand(64)}
    q, config = quantize_tensors(tensors, "int4", group_size=32)
    assert config["bits"] == {"w": 4, "odd": 8}  # 30 columns do not split into groups of 32
    assert q["w"].dtype == torch.uint8 and q["w"].shape == (8, 32)  # two int4 codes a byte
    assert q["odd"].dtype == torch.int8 and torch.equal(q["norm"], tensors["norm"])
    back = dequantize_tensors(q, config)
    assert set(back) == set(tensors)  # the scales are consumed
    step_w = tensors["w"].reshape(8, 2, 32).abs().amax(-1, keepdim=True) / 7
    assert ((back["w"] - tensors["w"]).reshape(8, 2, 32).abs() <= step_w / 2 + 1e-6).all()
    step_odd = tensors["odd"].abs().amax(1, keepdim=True) / 127
    assert ((back["odd"] - tensors["odd"]).abs() <= step_odd / 2 + 1e-6).all()


def test_a_foreign_quantization_is_refused_by_name() -> None:
    with pytest.raises(InputError, match="quant_method 'gptq' is not supported"):
        dequantize_tensors({}, {"quant_method": "gptq"}, "some/dir")


def test_int8_stage_halves_the_size_keeps_perplexity_and_reloads_alone(
    trained_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    out = compress(
        CompressConfig(method="quantize", model=trained_dir, data=data_dir, out=tmp_path / "q")
    )
    report = json.loads((out / "compression.json").read_text())
    assert report["size_ratio"] < 0.5
    assert report["after"]["weights_bytes"] == (out / "final" / "model.safetensors").stat().st_size
    assert abs(report["perplexity_delta_pct"]) < 2.0
    assert report["after"]["tokens"] == report["before"]["tokens"] > 0
    assert report["dynamic_int8"]["tokens_per_s"] > 0
    assert (out / "manifest.json").is_file() and (out / "final" / "tokenizer.json").is_file()
    hf = json.loads((out / "final" / "config.json").read_text())
    assert hf["quantization_config"]["quant_method"] == "lmforge"
    # the directory is complete without the original: reload, score and generate from it alone
    original, quantized = load_pretrained(trained_dir), load_pretrained(out / "final")
    ids = torch.arange(1, 30)[None]
    with torch.no_grad():
        ref = original(ids)
        diff = (ref - quantized(ids)).abs().max().item()
    assert 0 < diff < 0.02 * ref.abs().max().item()  # rounded, but within 2% of the logit range
    text = EvalModel.load(out).generate("def", GenerationSettings(max_new_tokens=5))
    assert isinstance(text, str)


def test_int4_is_smaller_than_int8(trained_dir: Path, tmp_path: Path) -> None:
    q8 = quantize_dir(trained_dir, tmp_path / "q8", "int8", 32)
    q4 = quantize_dir(trained_dir, tmp_path / "q4", "int4", 32)
    assert 4 in q4["bits"].values() and set(q8["bits"].values()) == {8}
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "q4") < 0.7 * size(tmp_path / "q8")
    logits = [load_pretrained(tmp_path / d)(torch.arange(1, 20)[None]) for d in ("q4", "q8")]
    assert torch.isfinite(logits[0]).all() and not torch.equal(*logits)


def test_quantizing_a_quantized_model_is_a_config_error(trained_dir: Path, tmp_path: Path) -> None:
    quantize_dir(trained_dir, tmp_path / "q8", "int8", 32)
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_dir(tmp_path / "q8", tmp_path / "again", "int8", 32)


def test_dynamic_int8_quantizes_every_linear_and_stays_close(trained_dir: Path) -> None:
    model = load_pretrained(trained_dir)
    dyn = dynamic_int8(model)
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    n_linear = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert sum(type(m) is torch.nn.Linear for m in dyn.modules()) == 0
    assert sum(isinstance(m, DynamicLinear) for m in dyn.modules()) == n_linear > 0
    ids = torch.arange(1, 30)[None]
    with torch.no_grad():
        ref, got = model(ids), dyn(ids)
    assert (ref - got).abs().max().item() < 0.1 * ref.abs().max().item()
    assert (ref.argmax(-1) == got.argmax(-1)).float().mean() > 0.9


def test_gpt2_style_checkpoint_quantizes_and_reloads(tmp_path: Path) -> None:
    from unit.evals.helpers import make_model_dir

    src = make_model_dir(tmp_path / "gpt2", preset="micro-gpt2")
    quant = quantize_dir(src, tmp_path / "q", "int8", 32)
    assert any("wpe" in name or "position" in name for name in quant["bits"])  # learned positions
    ids = torch.arange(1, 30)[None]
    with torch.no_grad():
        ref, got = load_pretrained(src)(ids), load_pretrained(tmp_path / "q")(ids)
    assert (ref - got).abs().max().item() < 0.02 * ref.abs().max().item()


def test_the_stage_refuses_a_quantized_source_before_loading_or_measuring_it(
    trained_dir: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-quantizing is refused up front, not after the slow measurement of the source."""
    from lmforge.compress import measure

    quantize_dir(trained_dir, tmp_path / "q8", "int8", 32)

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the source was loaded or measured before the refusal")

    monkeypatch.setattr(measure, "model_report", no_work)
    monkeypatch.setattr(EvalModel, "load", no_work)
    cfg = CompressConfig(
        method="quantize", model=tmp_path / "q8", data=data_dir, out=tmp_path / "o"
    )
    with pytest.raises(ConfigError) as err:
        compress(cfg)
    msg = str(err.value)
    assert f"{tmp_path / 'q8'} is already quantized (lmforge)" in msg
    assert "quantize the float checkpoint it was made from" in msg
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_a_decoder_classifiers_rounded_head_keeps_its_predictions(tmp_path: Path) -> None:
    # quantize rounds every matrix, the score head's too: on a tiny trained classifier the
    # predictions stay and the log-probabilities move little (the README's numbers)
    import numpy as np

    from lmforge.finetune.stage import FinetuneConfig, finetune
    from unit.finetune.helpers import make_model_dir, make_tokenizer_dir

    words = ["alpha", "beta", "gamma", "delta", "one", "two", "three", "four"]
    rows = [{"text": f"{words[i % 4]} {words[(i * 3 + 1) % 8]} text", "label": words[i % 4]}
            for i in range(192)]  # fmt: skip
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = make_model_dir(tmp_path / "base", make_tokenizer_dir(tmp_path / "tok"))
    train = {"max_steps": 40, "lr": 3e-3, "micro_batch_size": 8, "seq_len": 32,
             "warmup_steps": 2, "eval_every": 0, "eval_steps": 1, "ckpt_every": 0}  # fmt: skip
    out = finetune(FinetuneConfig.model_validate({"model": base, "data": tmp_path / "train.jsonl",
                   "out": tmp_path / "ft", "task": "classify", "train": train}))  # fmt: skip
    texts = [r["text"] for r in rows[:16]]
    want = np.asarray([EvalModel.load(out).classify(t) for t in texts])
    for scheme, tol in (("int8", 0.02), ("int4", 0.6)):
        values = {"method": "quantize", "model": out, "out": tmp_path / scheme,
                  "quantize": {"scheme": scheme}}  # fmt: skip
        final = compress(CompressConfig.model_validate(values)) / "final"
        bits = json.loads((final / "config.json").read_text())["quantization_config"]["bits"]
        assert bits["score.weight"] == int(scheme[-1])
        got = np.asarray([EvalModel.load(final).classify(t) for t in texts])
        assert (got.argmax(1) == want.argmax(1)).all() and np.abs(got - want).max() <= tol
