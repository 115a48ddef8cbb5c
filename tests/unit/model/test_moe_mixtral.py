"""The mixtral family: transformers' Mixtral checkpoints (hub and fused expert layouts) import with
its logits and greedy tokens; our mixture-of-experts models export as MixtralForCausalLM."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lmforge.model.config import preset_config
from lmforge.model.convert import load_pretrained, save_pretrained
from lmforge.model.generate import generate
from lmforge.model.hf_families import family_for
from lmforge.model.transformer import Transformer

from .test_convert import randomize

transformers = pytest.importorskip("transformers")

VOCAB = 300


def _hf_mixtral(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        num_local_experts=4, num_experts_per_tok=2, **overrides,
    )  # fmt: skip
    return randomize(transformers.MixtralForCausalLM(cfg))


@pytest.mark.parametrize("sliding_window", [None, 6])
def test_mixtral_checkpoint_imports_with_its_logits_and_greedy_tokens(sliding_window, tmp_path):
    hf = _hf_mixtral(sliding_window=sliding_window, router_aux_loss_coef=0.02)
    hf.save_pretrained(tmp_path)  # the hub layout: block_sparse_moe.experts.N.w1/w2/w3
    ours = load_pretrained(tmp_path)
    cfg = ours.config
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob) == (4, 2, True)
    assert cfg.router_aux_loss_coef == 0.02 and cfg.sliding_window == sliding_window
    idx = torch.randint(0, VOCAB, (2, 30))
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max().item() <= 1e-4
        expected = hf.generate(idx[:1], max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(generate(ours, idx[:1], 12, greedy=True), expected)


def test_fused_expert_tensors_import_like_the_hub_layout(tmp_path):
    """transformers 5's in-memory names (mlp.experts.gate_up_proj (E, 2I, C), down_proj, mlp.gate)
    saved as they are load to the same model."""
    hf = _hf_mixtral()
    hf.save_pretrained(tmp_path / "hub")
    fused = tmp_path / "fused"
    fused.mkdir()
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, fused / "model.safetensors")
    (fused / "config.json").write_text((tmp_path / "hub" / "config.json").read_text())
    a, b = load_pretrained(tmp_path / "hub"), load_pretrained(fused)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_micro_moe_exports_as_mixtral(tmp_path):
    """The export's config.json (logits and the round trip: test_convert's OUR_MODELS)."""
    model = Transformer(preset_config("micro-moe", vocab_size=VOCAB, router_aux_loss_coef=0.02))
    assert family_for(model.config) == "mixtral"
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (4, 2)
    assert config["router_aux_loss_coef"] == 0.02
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert hf.config.num_local_experts == 4 and hf.config.tie_word_embeddings


def test_unnormalised_topk_exports_in_lmforge_layout(tmp_path):
    """Mixtral always renormalises the top-k weights: a Qwen-MoE-style model is no Mixtral."""
    model = Transformer(preset_config("micro-moe", norm_topk_prob=False, router_z_loss_coef=0.1))
    assert family_for(model.config) is None
    save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "lmforge"
    back = load_pretrained(tmp_path)
    assert back.config == model.config
