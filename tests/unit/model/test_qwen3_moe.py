"""The qwen3_moe family: transformers' Qwen3MoeForCausalLM checkpoints (hub and fused expert layouts)
import with its logits, greedy tokens and training loss; our qk_norm mixtures export as it; configs
that mix dense and sparse layers are refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lmforge.errors import InputError
from lmforge.model.config import preset_config
from lmforge.model.convert import (
    hf_config_to_model_config,
    load_classifier,
    load_pretrained,
    save_pretrained,
)
from lmforge.model.generate import generate
from lmforge.model.hf_families import family_for
from lmforge.model.transformer import Transformer
from unit.model.test_convert import PAD, VOCAB, pooled_logits, randomize, right_padded
from unit.model.test_moe_mixtral import assert_read_as_transformers
from unit.model.test_qwen3 import SHAPE as QWEN3_SHAPE

transformers = pytest.importorskip("transformers")

# Qwen3's test attention (head_dim 24, not hidden_size / heads); the experts' width
# moe_intermediate_size differs from the dense intermediate_size
SHAPE = QWEN3_SHAPE | dict(intermediate_size=80, moe_intermediate_size=48)
SHAPE |= dict(num_experts=4, num_experts_per_tok=2)
HF_MODELS = {
    "renormalised-tied": dict(norm_topk_prob=True, tie_word_embeddings=True),
    "raw-topk-untied": dict(norm_topk_prob=False, router_aux_loss_coef=0.02),
    # Qwen3MoeConfig has no layer_types: use_sliding_window slides every layer whatever
    # max_window_layers says
    "raw-topk-sliding": dict(use_sliding_window=True, sliding_window=6, max_window_layers=1),
}
IDX = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(0))


def hf_qwen3_moe(tmp_path, **changes) -> torch.nn.Module:
    """A random Qwen3MoeForCausalLM saved to tmp_path in the hub layout (per-expert tensors)."""
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(**{**SHAPE, **changes})
    hf = randomize(transformers.Qwen3MoeForCausalLM(config))
    hf.save_pretrained(tmp_path)
    return hf


def save_fused(hf: torch.nn.Module, model_dir) -> None:
    """Overwrite model_dir's weights with transformers 5's in-memory names, saved as they are
    (mlp.experts.gate_up_proj (E, 2I, C), mlp.experts.down_proj (E, C, I), mlp.gate)."""
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    if hf.config.tie_word_embeddings:  # one tensor under two names: written once, as the hub does
        del state["lm_head.weight"]
    save_file(state, model_dir / "model.safetensors")


@pytest.mark.parametrize("layout", ["hub", "fused"])
@pytest.mark.parametrize("kind", HF_MODELS)
def test_qwen3_moe_checkpoint_imports_with_its_logits_and_greedy_tokens(kind, layout, tmp_path):
    changes = HF_MODELS[kind]
    hf = hf_qwen3_moe(tmp_path, **changes)
    if layout == "fused":
        save_fused(hf, tmp_path)
    ours = load_pretrained(tmp_path)
    cfg = ours.config
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.intermediate_size) == (4, 2, 48)
    assert cfg.qk_norm and cfg.hd == 24 and cfg.norm_topk_prob == changes.get("norm_topk_prob", 0)
    assert cfg.router_aux_loss_coef == changes.get("router_aux_loss_coef", 0.001)
    assert cfg.sliding_window == changes.get("sliding_window")
    with torch.no_grad():
        assert (ours(IDX) - hf(IDX).logits).abs().max().item() <= 1e-4
        prompt = IDX[:1, :6]
        want = hf.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert torch.equal(generate(ours, prompt, 12, greedy=True), want)
    assert family_for(cfg) == "qwen3_moe"


def test_training_loss_equals_transformers_with_router_logits(tmp_path):
    """Cross-entropy + router_aux_loss_coef x load balancing, as Qwen3MoeForCausalLM computes with
    output_router_logits (its load_balancing_loss_func over every layer's router logits)."""
    hf = hf_qwen3_moe(tmp_path, router_aux_loss_coef=0.5)
    ours = load_pretrained(tmp_path).train()
    labels = torch.cat([IDX[:, 1:], torch.full((2, 1), -100)], dim=1)  # ours come shifted
    with torch.no_grad():
        out = hf(IDX, labels=IDX, output_router_logits=True)
        loss = ours(IDX, labels=labels)
        ours.eval()
        plain = ours(IDX, labels=labels)
    assert out.aux_loss > 1.0  # k=2 when balanced: the aux term is not negligible at coef 0.5
    torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss - plain, 0.5 * out.aux_loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_qk_norm_mixture_exports_as_qwen3_moe(norm_topk_prob, tmp_path):
    """The export's config.json (logits and the round trip: test_convert's OUR_MODELS)."""
    cfg = preset_config(
        "micro-moe", qk_norm=True, head_dim=24, norm_topk_prob=norm_topk_prob,
        router_aux_loss_coef=0.02,
    )  # fmt: skip
    model = Transformer(cfg)
    assert family_for(cfg) == "qwen3_moe"
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["head_dim"] == 24
    assert config["moe_intermediate_size"] == cfg.intermediate_size and config["num_experts"] == 4
    assert (config["norm_topk_prob"], config["mlp_only_layers"]) == (norm_topk_prob, [])
    assert (config["decoder_sparse_step"], config["router_aux_loss_coef"]) == (1, 0.02)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert hf.config.norm_topk_prob == norm_topk_prob and hf.config.num_experts == 4


def test_qwen3_moe_classifier_round_trips_through_transformers(tmp_path):
    """Qwen3MoeForSequenceClassification in (body + score, no lm_head) and back out."""
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(**SHAPE, num_labels=3, pad_token_id=PAD)
    hf = randomize(transformers.Qwen3MoeForSequenceClassification(config))
    hf.save_pretrained(tmp_path / "in")
    ours, head = load_pretrained(tmp_path / "in"), load_classifier(tmp_path / "in")
    idx = right_padded([12, 7, 20, 1])
    with torch.no_grad():
        expected = hf(idx).logits
    assert (pooled_logits(ours, head.weight, idx) - expected).abs().max().item() <= 1e-4
    save_pretrained(ours, tmp_path / "out", {"pad_token_id": PAD}, head)
    back, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert type(back).__name__ == "Qwen3MoeForSequenceClassification" and not any(info.values())
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(idx).logits, expected, atol=1e-5, rtol=0)


def test_every_layer_dense_imports_as_dense_qwen3(tmp_path):
    """mlp_only_layers covering every layer: Qwen3MoeMLP (intermediate_size wide) throughout."""
    hf = hf_qwen3_moe(tmp_path, mlp_only_layers=[0, 1])
    ours = load_pretrained(tmp_path)
    assert (ours.config.num_experts, ours.config.intermediate_size) == (0, 80)
    with torch.no_grad():
        assert (ours(IDX) - hf(IDX).logits).abs().max().item() <= 1e-4
    assert family_for(ours.config) == "qwen3"


@pytest.mark.parametrize(
    "changes, dense, sparse",
    [(dict(mlp_only_layers=[1]), [1], [0]), (dict(decoder_sparse_step=2), [0], [1])],
)
def test_configs_mixing_dense_and_sparse_layers_are_refused(changes, dense, sparse):
    hf = {"model_type": "qwen3_moe", **SHAPE, **changes}
    with pytest.raises(InputError) as err:
        hf_config_to_model_config(hf)
    msg = str(err.value)
    assert f"layers {dense} dense MLPs and layers {sparse} mixtures of experts" in msg
    assert "decoder_sparse_step" in msg and "mlp_only_layers" in msg and "all sparse" in msg


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(attention_bias=True), "attention_bias=True is not supported"),
        (dict(decoder_sparse_step=0), "decoder_sparse_step=0 must be an integer >= 1"),
        (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    ],
)
def test_unsupported_fields_are_refused_by_name(changes, match):
    with pytest.raises(InputError, match=match):
        hf_config_to_model_config({"model_type": "qwen3_moe", **SHAPE, **changes})


def test_omitted_fields_read_as_transformers_reads_them():
    """Qwen3MoeConfig's defaults (128 experts, top-8, raw top-k weights, 768-wide experts) and
    head_dim = hidden_size / heads (not Qwen3's 128), 4 KV heads; num_local_experts is read as num_experts."""
    hf = dict(model_type="qwen3_moe", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2)
    hf |= dict(num_attention_heads=8)
    want = transformers.Qwen3MoeConfig(**{k: v for k, v in hf.items() if k != "model_type"})
    cfg = hf_config_to_model_config(hf)
    assert (cfg.num_experts, cfg.num_experts_per_tok) == (want.num_experts, 8)
    assert (cfg.intermediate_size, cfg.norm_topk_prob) == (want.moe_intermediate_size, False)
    assert cfg.router_aux_loss_coef == want.router_aux_loss_coef
    assert cfg.hd == 8 and cfg.block_size == want.max_position_embeddings == 32768
    assert cfg.sliding_window is None and cfg.n_kv_head == want.num_key_value_heads == 4
    assert hf_config_to_model_config({**hf, "num_local_experts": 12}).num_experts == 12


def test_qwen3_30b_a3b_config_reads_as_its_architecture():
    """The hub's Qwen3-30B-A3B config.json (its architecture fields): 128 experts 768 wide, top-8
    renormalised; max_window_layers with use_sliding_window false leaves full attention."""
    hf = dict(
        model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], attention_bias=False,
        decoder_sparse_step=1, head_dim=128, hidden_act="silu", hidden_size=2048,
        intermediate_size=6144, max_position_embeddings=40960, max_window_layers=48,
        mlp_only_layers=[], moe_intermediate_size=768, norm_topk_prob=True, num_attention_heads=32,
        num_experts=128, num_experts_per_tok=8, num_hidden_layers=48, num_key_value_heads=4,
        output_router_logits=False, rms_norm_eps=1e-06, rope_scaling=None, rope_theta=1000000.0,
        router_aux_loss_coef=0.001, sliding_window=None, tie_word_embeddings=False,
        use_sliding_window=False, vocab_size=151936,
    )  # fmt: skip
    cfg = hf_config_to_model_config(hf)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.intermediate_size) == (128, 8, 768)
    assert cfg.norm_topk_prob and cfg.qk_norm and cfg.router_aux_loss_coef == 0.001
    assert (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.hd, cfg.n_embd) == (48, 32, 4, 128, 2048)
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.sliding_window) == (1e6, None, None)
    assert cfg.block_size == 40960 and not cfg.tie_embeddings and family_for(cfg) == "qwen3_moe"


@pytest.mark.parametrize(
    "config_json",
    [
        {"model_type": "qwen3_moe"},  # the config class's shape: 128 experts, top-8, 4 KV heads
        # no max_position_embeddings: YaRN's original length is Qwen3MoeConfig's 32768
        {"model_type": "qwen3_moe", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
        {"model_type": "qwen3_moe", "num_hidden_layers": 2,
         "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}},
    ],
    ids=["omitted", "yarn-default-length", "rope-parameters"],
)  # fmt: skip
def test_config_json_reads_rope_and_shape_as_transformers_does(config_json, tmp_path):
    assert_read_as_transformers(config_json, tmp_path, "num_experts", "moe_intermediate_size")
