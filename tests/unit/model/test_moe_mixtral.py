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
from .test_rope import rope_read_as_transformers

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


def assert_read_as_transformers(config_json: dict, tmp_path, experts: str, width: str) -> None:
    """hf_config_to_model_config(config_json) reads every field our model has as transformers'
    AutoConfig reads the same file, omitted fields included (experts / width: the config
    class's names for the expert count and an expert's width)."""
    ours, theirs = rope_read_as_transformers(config_json, tmp_path)
    head_dim = getattr(theirs, "head_dim", None) or theirs.hidden_size // theirs.num_attention_heads
    assert (ours.vocab_size, ours.n_embd, ours.n_layer, ours.n_head, ours.n_kv_head, ours.hd) == (
        theirs.vocab_size, theirs.hidden_size, theirs.num_hidden_layers,
        theirs.num_attention_heads, theirs.num_key_value_heads, head_dim,
    )  # fmt: skip
    assert (ours.norm_eps, ours.tie_embeddings) == (theirs.rms_norm_eps, theirs.tie_word_embeddings)
    assert ours.num_experts == getattr(theirs, experts)
    assert ours.num_experts_per_tok == theirs.num_experts_per_tok
    assert ours.intermediate_size == getattr(theirs, width)
    assert ours.router_aux_loss_coef == theirs.router_aux_loss_coef


@pytest.mark.parametrize(
    "config_json",
    [
        {"model_type": "mixtral"},  # Mixtral-8x7B's shape: top-2 of 8, 8 KV heads, eps 1e-5
        {"model_type": "mixtral", "num_hidden_layers": 2, "num_experts_per_tok": 3},
        {"model_type": "mixtral", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
    ],
    ids=["omitted", "some-given", "yarn-default-length"],
)
def test_omitted_mixtral_fields_read_as_transformers_reads_them(config_json, tmp_path):
    assert_read_as_transformers(config_json, tmp_path, "num_local_experts", "intermediate_size")
