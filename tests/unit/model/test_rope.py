"""RoPE scaling types (model/rope.py) against transformers 5.x on tiny random checkpoints.

Sequences run past original_max_position_embeddings, where every scaling changes the logits.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from lmforge.errors import ConfigError, InputError
from lmforge.model.config import ModelConfig, preset_config
from lmforge.model.convert import hf_config_to_model_config, load_pretrained, save_pretrained
from lmforge.model.generate import generate
from lmforge.model.rope import rope_attention_factor, rope_inv_freq
from lmforge.model.transformer import Transformer

transformers = pytest.importorskip("transformers")

VOCAB, BLOCK = 300, 64
SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
SMALL |= dict(intermediate_size=96, max_position_embeddings=BLOCK)
YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)
ROPES = {
    "llama-linear": ("llama", dict(rope_type="linear", factor=2.0)),
    "llama-yarn": ("llama", YARN),
    "llama-yarn-betas-mscale-untruncated": (
        "llama",
        YARN
        | dict(original_max_position_embeddings=32, beta_fast=4.0, beta_slow=0.5)
        | dict(mscale=1.0, mscale_all_dim=0.5, truncate=False),
    ),
    "llama-yarn-attention-factor": ("llama", YARN | dict(attention_factor=0.8)),
    "qwen2-yarn": ("qwen2", YARN),
    "mistral-yarn": ("mistral", YARN),
    "mixtral-linear": ("mixtral", dict(rope_type="linear", factor=2.0)),
    "llama-dynamic": ("llama", dict(rope_type="dynamic", factor=2.0)),
}
WINDOW = dict(sliding_window=24)  # < BLOCK: the export is then mistral/mixtral, not llama
FAMILIES = {
    "llama": (transformers.LlamaConfig, {}),
    "qwen2": (transformers.Qwen2Config, {}),
    "mistral": (transformers.MistralConfig, WINDOW),
    "mixtral": (transformers.MixtralConfig, WINDOW | dict(num_local_experts=4)),
}


def hf_model(family: str, rope: dict, seed: int = 0) -> torch.nn.Module:
    """A random transformers model whose rope_parameters are rope (theta 100: fast-turning dims)."""
    config_class, extra = FAMILIES[family]
    config = config_class(
        **SMALL, **extra, num_key_value_heads=2, rope_parameters={"rope_theta": 100.0, **rope}
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(params=list(ROPES))
def imported(request, tmp_path):
    """(transformers model, its saved directory, our import of it) for each scaling."""
    hf = hf_model(*ROPES[request.param])
    hf.save_pretrained(tmp_path / "hf")
    return hf, tmp_path / "hf", load_pretrained(tmp_path / "hf")


def test_imported_logits_match_transformers_past_the_original_context(imported):
    hf, _, ours = imported
    idx = torch.randint(0, VOCAB, (2, BLOCK))
    with torch.no_grad():
        expected, got = hf(idx).logits, ours(idx)
        plain = Transformer(replace(ours.config, rope_scaling=None)).eval()
        plain.load_state_dict(ours.state_dict())
        unscaled = plain(idx)
    assert (got - expected).abs().max().item() <= 1e-4
    if ours.config.rope_scaling["rope_type"] != "dynamic":  # dynamic: default within block_size
        assert (unscaled - expected).abs().max().item() > 1e-2  # the scaling is what matched


def test_greedy_generation_through_the_kv_cache_equals_transformers(imported):
    hf, _, ours = imported
    prompt = torch.randint(0, VOCAB, (1, 10))  # inside the original context, then past it
    new = BLOCK - prompt.size(1)
    hf.generation_config.eos_token_id = None  # run to the end, as ours does without stops
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=new, do_sample=False)
    got = generate(ours, prompt, new, greedy=True)
    assert got.tolist() == expected.tolist()


def test_export_writes_the_rope_dict_back_and_transformers_agrees(imported, tmp_path):
    hf, path, ours = imported
    save_pretrained(ours, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    imported_json = json.loads((path / "config.json").read_text())
    assert written["model_type"] == imported_json["model_type"]  # the family, not llama
    assert written["rope_parameters"] == imported_json["rope_parameters"]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    idx = torch.randint(0, VOCAB, (1, BLOCK))
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, hf(idx).logits, atol=1e-5, rtol=0)
    assert load_pretrained(tmp_path / "out").config == ours.config


def test_dynamic_ntk_refuses_sequences_past_block_size_where_transformers_rescales(tmp_path):
    hf = hf_model("llama", dict(rope_type="dynamic", factor=2.0))
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    with pytest.raises(InputError, match=f"exceeds model.block_size={BLOCK}"):
        ours(torch.zeros(1, BLOCK + 1, dtype=torch.long))


def v4_config(**rope_scaling) -> dict:
    """A transformers 4.x style llama config.json with rope_scaling (legacy "type" key)."""
    return dict(SMALL, model_type="llama", rope_theta=500.0, rope_scaling=rope_scaling)


def test_v4_rope_scaling_is_read_and_original_length_filled_as_transformers_does():
    cfg = hf_config_to_model_config(v4_config(type="yarn", factor=4.0, finetuned=True))
    assert cfg.rope_theta == 500.0
    assert cfg.rope_scaling == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": BLOCK,
    }
    top_level = v4_config(type="yarn", factor=4.0, original_max_position_embeddings=32)
    top_level["original_max_position_embeddings"] = 8  # Phi-3 style: wins over the dict's
    assert (
        hf_config_to_model_config(top_level).rope_scaling["original_max_position_embeddings"] == 8
    )
    assert hf_config_to_model_config(v4_config(type="linear", factor=2)).rope_scaling == {
        "rope_type": "linear",
        "factor": 2,
    }


NO_LENGTH = {k: v for k, v in SMALL.items() if k != "max_position_embeddings"}
LINEAR = dict(rope_type="linear", factor=2.0)


@pytest.mark.parametrize(
    "config_json",
    [
        # both layouts in one file: transformers takes rope_scaling, then the top-level theta
        dict(SMALL, model_type="llama", rope_theta=5.0, rope_scaling=LINEAR,
             rope_parameters=dict(LINEAR, factor=3.0, rope_theta=7.0)),
        # the rope dict's theta wins over the top-level one
        dict(SMALL, model_type="llama", rope_theta=5.0,
             rope_parameters=dict(LINEAR, rope_theta=7.0)),
        # no max_position_embeddings: each family's default is block_size and YaRN's old length
        dict(NO_LENGTH, model_type="mistral", rope_scaling={"rope_type": "yarn", "factor": 4.0}),
        dict(NO_LENGTH, model_type="qwen2", rope_scaling={"type": "yarn", "factor": 4.0}),
        dict(NO_LENGTH, model_type="mixtral", num_local_experts=4, num_key_value_heads=2,
             rope_parameters={"rope_type": "dynamic", "factor": 2.0}),  # and theta 1e6
    ],
    ids=["both-layouts", "theta-in-dict", "mistral-defaults", "qwen2-defaults", "mixtral-defaults"],
)  # fmt: skip
def test_config_json_is_read_as_transformers_reads_it(config_json, tmp_path):
    rope_read_as_transformers(config_json, tmp_path)


def rope_read_as_transformers(config_json: dict, tmp_path) -> tuple[ModelConfig, object]:
    """(ours, transformers' AutoConfig) read from config_json, having checked that both read
    the same rope theta and scaling (default: our None), block_size and sliding_window."""
    (tmp_path / "config.json").write_text(json.dumps(config_json))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    ours = hf_config_to_model_config(config_json)
    rope = dict(theirs.rope_parameters)
    rope.pop("type", None)  # v4's name, kept beside rope_type
    assert ours.rope_theta == rope.pop("rope_theta")
    assert ours.block_size == theirs.max_position_embeddings
    # sliding_window: Mistral's default 4096, Mixtral's None (Llama has none)
    assert ours.sliding_window == getattr(theirs, "sliding_window", None)
    scaling = {k: v for k, v in rope.items() if v is not None}
    assert ours.rope_scaling == (None if scaling == {"rope_type": "default"} else scaling)
    return ours, theirs


@pytest.mark.parametrize(
    "rope",
    [
        # nulls: transformers' defaults (betas 32/1, 0.1 ln(factor) + 1), but truncate null is off
        dict(YARN, attention_factor=None, beta_fast=None, beta_slow=None, mscale=None,
             mscale_all_dim=None, truncate=None),
        dict(YARN, mscale=0.8),  # without mscale_all_dim: the default factor
        dict(YARN, mscale=0, mscale_all_dim=1.0),  # a zero one: the default too
        dict(YARN, mscale=1.0, mscale_all_dim=0.5, beta_fast=8, beta_slow=2),
        dict(YARN, factor=0.5),  # < 1: transformers warns, computes; attention factor 1
        dict(rope_type="linear", factor=0.5),
        dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
             original_max_position_embeddings=16),
        dict(rope_type="dynamic", factor=4.0),  # within max_position_embeddings: the default
    ],
)  # fmt: skip
def test_frequencies_and_attention_factor_equal_transformers(rope, tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config_json = dict(SMALL, model_type="llama", rope_theta=100.0, rope_scaling=rope)
    (tmp_path / "config.json").write_text(json.dumps(config_json))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    inv_freq, attention = ROPE_INIT_FUNCTIONS[rope["rope_type"]](theirs)
    ours = hf_config_to_model_config(config_json)
    torch.testing.assert_close(rope_inv_freq(ours), inv_freq, rtol=1e-6, atol=0)
    assert rope_attention_factor(ours) == pytest.approx(attention, rel=1e-12)


@pytest.mark.parametrize(
    "rope, message",
    [
        (dict(type="longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8),
         "rope_type 'longrope' is not supported: transformers switches every position between "
         "short_factor and long_factor"),
        (dict(type="su", factor=2.0),
         "rope_type 'su' is not one of default, linear, dynamic, llama3, yarn"),
        (dict(type="yarn"), "config.json rope_scaling needs factor for rope_type 'yarn'"),
        (dict(type="linear", factor="2"),
         r"config.json rope_scaling.factor must be a number > 0, got '2'"),
        (dict(type="yarn", factor=4.0, truncate="no"), "truncate must be true or false, got 'no'"),
        (dict(type="linear", factor=2.0, partial_rotary_factor=0.5),
         "partial_rotary_factor=0.5 is not supported: lmforge rotates every dimension"),
        ({"full_attention": dict(rope_type="yarn", factor=4.0), "sliding_attention": {}},
         r"one per layer type \(full_attention, sliding_attention\); lmforge rotates every"),
    ],
)  # fmt: skip
def test_config_json_rope_refusals_name_the_key(rope, message):
    with pytest.raises(InputError, match=message):
        hf_config_to_model_config(v4_config(**rope))


@pytest.mark.parametrize(
    "scaling, message",
    [
        ({"rope_type": "yarn", "factor": 4.0},
         "model.rope_scaling needs original_max_position_embeddings for rope_type 'yarn'"),
        ({"rope_type": "linear", "factor": 2.0, "beta_fast": 8},
         "model.rope_scaling has beta_fast, which rope_type 'linear' does not take; "
         "it takes factor"),
        ({"rope_type": "dynamic", "factor": 0}, r"model.rope_scaling.factor must be a number > 0"),
        ({"rope_type": "linear", "factor": None},
         r"model.rope_scaling.factor must be a number > 0, got None"),
        (YARN | {"mscale": "1"},
         "model.rope_scaling.mscale must be a number, got '1'"),
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
          "original_max_position_embeddings": 16}, "high_freq_factor must be greater than low"),
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1.5},
         "original_max_position_embeddings must be an integer >= 1, got 1.5"),
        ("yarn", "model.rope_scaling must be a mapping with a rope_type"),
    ],
)  # fmt: skip
def test_model_config_rope_refusals_name_the_key(scaling, message):
    with pytest.raises(ConfigError, match=message):
        preset_config("micro", rope_scaling=scaling)


def test_yarn_attention_factor_scales_the_rotary_tables():
    cfg = preset_config("micro", rope_scaling=dict(YARN))
    plain, scaled = Transformer(replace(cfg, rope_scaling=None)), Transformer(cfg)
    norm = (scaled.rope_cos**2 + scaled.rope_sin**2).sqrt()
    torch.testing.assert_close(
        norm, torch.full_like(norm, 0.1 * torch.log(torch.tensor(4.0)).item() + 1)
    )
    torch.testing.assert_close(plain.rope_cos[:, 0], scaled.rope_cos[:, 0] / norm[:, 0])  # kept
    assert isinstance(cfg, ModelConfig) and ModelConfig.from_dict(cfg.to_dict()) == cfg
