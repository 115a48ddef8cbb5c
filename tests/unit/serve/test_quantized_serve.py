"""An int8 directory is served int8: the engine keeps the codes and its greedy tokens are the
dequantized model's (up to bf16 rounding of near-ties)."""

from __future__ import annotations

import logging

import torch

from lmforge.compress.quantize import quantize_dir
from lmforge.model.convert import load_pretrained
from lmforge.model.generate import generate
from lmforge.model.quant import QuantLinear
from lmforge.serve.engine import Engine, SamplingParams, collect

PROMPTS = ["What is the capital of France?", "def f(x):", "Paris", "user assistant"]


def test_an_int8_dir_is_served_int8_with_the_dequantized_models_greedy_choices(
    serve_model_dir, tmp_path, caplog
) -> None:
    q = tmp_path / "int8"
    quantize_dir(serve_model_dir, q, "int8", 32)
    with caplog.at_level(logging.INFO, logger="lmforge.model.convert"):
        engine = Engine.from_dir(q, device="cpu", max_batch_size=8)
    assert "matrices quantized (int8)" in caplog.text  # the server's log says so
    assert any(isinstance(m, QuantLinear) for m in engine.model.modules())
    floats = load_pretrained(q, quantized="dequantize")
    engine.start()
    try:
        prompts = [engine.files.encode(p) for p in PROMPTS]
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        handles = [engine.submit(ids, params, f"q{i}") for i, ids in enumerate(prompts)]
        served = [collect(h).token_ids for h in handles]  # decoded together in one batch
    finally:
        engine.shutdown(drain=False)
    for ids, tokens in zip(prompts, served, strict=True):
        alone = generate(engine.model, torch.tensor([ids]), 12, greedy=True)[0, len(ids) :]
        assert tokens == alone.tolist()  # batching changes nothing
        # the int8 kernel takes bf16 activations (quant.KERNEL_DTYPE), so near-ties may break the
        # other way than in fp32: every served token is the dequantized model's greedy choice up
        # to 1% of its logit range, judged on the served prefix (teacher forcing)
        with torch.no_grad():
            logits = floats(torch.tensor([ids + tokens]))[0, len(ids) - 1 : -1]  # (12, V)
        chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        gap = logits.max(-1).values - chosen
        assert (gap <= 1e-2 * logits.abs().max()).all(), gap
    assert len({tuple(t) for t in served}) > 1  # the model is not degenerate
