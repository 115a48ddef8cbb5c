"""`lmforge pretrain --set model.qk_norm=true`: a micro model with QK-norm learns and its final/
directory is a Qwen3 checkpoint transformers computes alike."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from integration.test_pretrain_stage import SMALL, lmforge, make_shards


@pytest.mark.integration
def test_pretrain_with_qk_norm_learns_and_exports_qwen3(tmp_path):
    tokens, tok_dir = make_shards(tmp_path)
    out = tmp_path / "pretrain"
    lmforge("pretrain", "--tokens", str(tokens), "--tokenizer", str(tok_dir), "--out", str(out),
            *SMALL, "--set", "train.max_steps=20", "--set", "model.qk_norm=true")  # fmt: skip
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    vocab = json.loads((tokens / "meta.json").read_text())["vocab_size"]
    assert losses[0] > math.log(vocab) - 0.5  # starts near uniform
    assert json.loads((out / "manifest.json").read_text())["metrics"]["val_loss"] < losses[0] - 2

    config = json.loads((out / "final" / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["lmforge"]["qk_norm"] is True
    transformers = pytest.importorskip("transformers")
    from lmforge.model.convert import load_pretrained

    ours = load_pretrained(out / "final")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "final").eval()
    assert not torch.equal(ours.blocks[0].attn.q_norm.weight, torch.ones(16))  # it trained
    val = np.fromfile(tokens / "val.bin", dtype=np.uint16)[:32].astype(np.int64)
    ids = torch.from_numpy(val)[None]
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-4
