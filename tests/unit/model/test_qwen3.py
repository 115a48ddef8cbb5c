"""model.qk_norm and the Qwen3 family: logits and greedy tokens equal transformers' Qwen3 both
ways, every decoding path normalises q/k, and LoRA, quantized loads and ONNX take the model."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lmforge.compress.quantize import quantize_dir
from lmforge.errors import ConfigError, InputError
from lmforge.finetune.lora import (
    LoraConfig,
    inject,
    load_peft_adapter,
    lora_modules,
    save_peft_adapter,
)
from lmforge.model.config import preset_config
from lmforge.model.convert import (
    ClassifierHead,
    hf_config_to_model_config,
    load_classifier,
    load_pretrained,
    save_pretrained,
)
from lmforge.model.generate import generate, left_pad
from lmforge.model.hf_families import family_for
from lmforge.model.quant import QuantLinear
from lmforge.model.transformer import Transformer
from unit.model.test_convert import PAD, VOCAB, pooled_logits, randomize, right_padded

transformers = pytest.importorskip("transformers")

# head_dim 24 with 4 heads is not hidden_size / heads (64 / 4): Qwen3's explicit head_dim
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
SHAPE |= dict(num_key_value_heads=2, head_dim=24, intermediate_size=96, max_position_embeddings=64)
HF_MODELS = {
    "tied-gqa-wide-heads": dict(tie_word_embeddings=True),
    "untied-mha-plain-heads": dict(num_key_value_heads=4, head_dim=16, rope_theta=1e6),
}
IDX = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))


def hf_qwen3(tmp_path, **changes) -> nn.Module:
    """A random Qwen3ForCausalLM saved to tmp_path (norm gains near 1, not exactly 1)."""
    torch.manual_seed(0)
    config = transformers.Qwen3Config(**{**SHAPE, **changes})
    hf = randomize(transformers.AutoModelForCausalLM.from_config(config))
    hf.save_pretrained(tmp_path)
    return hf


def ours_qwen3(**overrides) -> Transformer:
    cfg = preset_config("micro", vocab_size=VOCAB, qk_norm=True, head_dim=24, **overrides)
    return randomize(Transformer(cfg))


@pytest.mark.parametrize("kind", HF_MODELS)
def test_qwen3_checkpoint_imports_with_transformers_logits_and_greedy_tokens(kind, tmp_path):
    hf = hf_qwen3(tmp_path, **HF_MODELS[kind])
    ours = load_pretrained(tmp_path)
    assert ours.config.qk_norm and ours.config.hd == HF_MODELS[kind].get("head_dim", 24)
    with torch.no_grad():
        assert (ours(IDX) - hf(IDX).logits).abs().max().item() <= 1e-4
        prompt = IDX[:, :6]
        want = hf.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert torch.equal(generate(ours, prompt, 12, greedy=True), want)
    assert family_for(ours.config) == "qwen3"


def test_import_keeps_head_dim_norm_weights_and_theta(tmp_path):
    hf = hf_qwen3(tmp_path, **HF_MODELS["untied-mha-plain-heads"])
    ours = load_pretrained(tmp_path)
    assert ours.config.head_dim is None and ours.config.hd == 16  # 64 / 4: the plain width
    assert ours.config.rope_theta == 1e6 and not ours.config.tie_embeddings
    q_norm = hf.model.layers[1].self_attn.q_norm.weight
    assert torch.equal(ours.blocks[1].attn.q_norm.weight, q_norm)
    assert ours.blocks[1].attn.k_norm.weight.shape == (16,)


LLAMA3_ROPE = dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0)
EXPORTS = {
    "tied": {},
    "untied-window": {"tie_embeddings": False, "sliding_window": 5},
    "llama3-rope": {"rope_scaling": {**LLAMA3_ROPE, "original_max_position_embeddings": 16}},
}


@pytest.mark.parametrize("kind", EXPORTS)
def test_export_loads_as_qwen3_in_transformers_with_same_logits(kind, tmp_path):
    model = ours_qwen3(**EXPORTS[kind])
    save_pretrained(model, tmp_path, extra_config={"eos_token_id": 2})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["head_dim"] == 24
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    idx = IDX[:, :24]  # longer than the window: sliding attention differs from full here
    with torch.no_grad():
        expected = model(idx)
        assert (hf(idx).logits - expected).abs().max().item() <= 1e-4
    back = load_pretrained(tmp_path)
    assert back.config == model.config
    torch.testing.assert_close(back(idx), expected, atol=0, rtol=0)


def test_qwen3_classifier_export_loads_in_transformers_with_same_logits(tmp_path):
    model = ours_qwen3()
    score = 0.1 * torch.randn(3, model.config.n_embd, generator=torch.Generator().manual_seed(2))
    save_pretrained(model, tmp_path, {"pad_token_id": PAD}, ClassifierHead(score, ["a", "b", "c"]))
    hf, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert type(hf).__name__ == "Qwen3ForSequenceClassification" and not any(info.values())
    idx = right_padded([12, 7, 20, 1])
    with torch.no_grad():
        expected = hf.eval()(idx).logits
    assert (pooled_logits(model, score, idx) - expected).abs().max().item() <= 1e-4
    assert torch.equal(load_classifier(tmp_path).weight, score)


def test_a_meta_device_build_gets_unit_qk_norm_gains_from_init_weights():
    with torch.device("meta"):
        model = Transformer(preset_config("micro", qk_norm=True))
    model.to_empty(device="cpu")
    model.init_weights()
    assert all(torch.equal(b.attn.k_norm.weight, torch.ones(16)) for b in model.blocks)


def test_qk_norm_changes_the_logits_so_the_parity_tests_can_fail():
    model = ours_qwen3()
    with torch.no_grad():
        before = model(IDX)
        model.blocks[0].attn.k_norm.weight.mul_(2.0)  # scales every attention score of layer 0
        assert (model(IDX) - before).abs().max() > 1e-2


def test_qk_norm_models_no_hf_family_computes_export_in_lmforge_layout(tmp_path):
    for overrides in ({"attn_bias": True}, {"bias": True}):
        model = ours_qwen3(**overrides)
        assert family_for(model.config) is None
        save_pretrained(model, tmp_path / "m")
        assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "lmforge"
        back = load_pretrained(tmp_path / "m")
        torch.testing.assert_close(back(IDX), model(IDX), atol=0, rtol=0)
    gpt2_style = preset_config("micro-gpt2", qk_norm=True)
    assert family_for(gpt2_style) is None


def test_qk_norm_is_refused_on_an_encoder_decoder_whose_cross_attention_lacks_it():
    with pytest.raises(ConfigError, match=r"n_dec_layer > 0 .*qk_norm=false"):
        preset_config("bart-micro", qk_norm=True)
    assert preset_config("bert-micro", qk_norm=True).qk_norm  # self-attention only: all of it


def test_qwen3_configs_lmforge_cannot_compute_are_refused():
    base = {"model_type": "qwen3", **SHAPE}
    mixed = {**base, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}
    for refused in (
        mixed,  # layers 0 full, 1 sliding
        {**base, "layer_types": ["sliding_attention"] * 2},  # sliding, with no window
        {**base, "layer_types": ["chunked_attention"] * 2},
    ):
        with pytest.raises(InputError, match=r"lmforge runs one attention in every layer.*=0"):
            hf_config_to_model_config(refused)
    with pytest.raises(InputError, match="attention_bias=True is not supported"):
        hf_config_to_model_config({**base, "attention_bias": True})
    all_sliding = hf_config_to_model_config({**mixed, "max_window_layers": 0})
    assert all_sliding.sliding_window == 8 and all_sliding.qk_norm
    unused = hf_config_to_model_config({**base, "use_sliding_window": False, "sliding_window": 8})
    assert unused.sliding_window is None  # Qwen3Config ignores the window when it is off


def test_a_qwen3_config_json_omitting_fields_reads_as_transformers_reads_it():
    """Qwen3Config's own defaults (head_dim 128, 32768 positions, a 4096 window when sliding is
    on), not the Llama fallbacks (n_embd / n_head, 2048, no window)."""
    minimal = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    minimal |= dict(intermediate_size=96)
    for extra in ({}, {"use_sliding_window": True, "max_window_layers": 0}):
        theirs = transformers.Qwen3Config(**minimal, **extra)
        ours = hf_config_to_model_config({"model_type": "qwen3", **minimal, **extra})
        assert (ours.hd, ours.block_size, ours.sliding_window) == (
            theirs.head_dim,
            theirs.max_position_embeddings,
            theirs.sliding_window,
        )
        assert (ours.norm_eps, ours.rope_theta) == (
            theirs.rms_norm_eps,
            theirs.rope_parameters["rope_theta"],
        )
    assert ours.hd == 128 and ours.sliding_window == 4096  # the defaults, not 16 and None


@pytest.mark.parametrize("compile", ["off", "on"])
def test_cached_padded_and_compiled_decoding_equal_recomputing_the_prefix(compile, monkeypatch):
    from lmforge.model import compiled_decode

    monkeypatch.setattr(compiled_decode, "BACKEND", "aot_eager")  # seconds, not inductor's
    model = ours_qwen3(sliding_window=6)
    ids, mask = left_pad([[5, 9, 2, 7, 4, 11, 3], [8, 8, 1]])
    uncached = generate(model, ids, 10, pad_mask=mask, greedy=True, use_cache=False)
    cached = generate(model, ids, 10, pad_mask=mask, greedy=True, compile=compile)
    assert torch.equal(cached, uncached)


def test_peft_loads_our_lora_adapter_on_the_qwen3_export(tmp_path):
    peft = pytest.importorskip("peft")
    model = ours_qwen3()
    save_pretrained(model, tmp_path / "base")
    inject(model, LoraConfig(r=4, alpha=8))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)
    save_peft_adapter(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(IDX).logits
        assert (model(IDX) - theirs).abs().max() <= 1e-4
        with peft_model.disable_adapter():
            assert (peft_model(IDX).logits - theirs).abs().max() > 1e-3  # the adapter counts


def test_a_hugging_face_peft_adapter_on_a_qwen3_checkpoint_loads_exactly(tmp_path):
    """HF PEFT's adapter of a transformers Qwen3 (separate q/k/v and gate/up, each its own A)
    reads onto our import as the same updates: what finetune and serve's --lora load."""
    peft = pytest.importorskip("peft")
    hf = hf_qwen3(tmp_path / "base", **HF_MODELS["tied-gqa-wide-heads"])
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(4)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    peft_model = peft.get_peft_model(hf, config).eval()  # random A and B
    peft_model.save_pretrained(tmp_path / "adapter")
    ours = load_peft_adapter(load_pretrained(tmp_path / "base"), tmp_path / "adapter")
    with torch.no_grad():
        theirs = peft_model(IDX).logits
        got = ours(IDX)
        with peft_model.disable_adapter():
            assert (peft_model(IDX).logits - theirs).abs().max() > 1e-2  # the adapter counts
    assert (got - theirs).abs().max() <= 1e-4


# how far the rounded weights' logits may be from the float model's, relative to the largest
# logit (measured: int8 2.7%, int4 45% on these random weights with groups of 32)
@pytest.mark.parametrize(("kind", "tol"), [("int8", 0.05), ("int4", 0.6)])
def test_quantized_qwen3_loads_kept_with_dequantized_logits(kind, tol, tmp_path):
    model = ours_qwen3()
    save_pretrained(model, tmp_path / "f32")
    quantize_dir(tmp_path / "f32", tmp_path / kind, kind, 32)
    kept = load_pretrained(tmp_path / kind)
    floats = load_pretrained(tmp_path / kind, quantized="dequantize")
    assert isinstance(kept.blocks[0].attn.qkv, QuantLinear)
    assert torch.equal(kept.blocks[0].attn.q_norm.weight, model.blocks[0].attn.q_norm.weight)
    with torch.no_grad():
        got, want = kept(IDX), floats(IDX)
        # torch's int8/int4 kernels take bf16 activations: bf16 rounding (test_quant_load.py),
        # measured 1.2% of the largest logit here (0.8% without qk_norm: unit-rms q/k sharpen
        # these random weights' attention)
        assert (got - want).abs().max() < 2e-2 * want.abs().max()
        exact = model(IDX)
        assert 0 < (want - exact).abs().max() < tol * exact.abs().max()  # rounded, same model


def test_onnx_export_of_a_qk_norm_model_matches_pytorch(tmp_path):
    pytest.importorskip("onnxruntime")
    from lmforge.compress.onnx_export import check_onnx, export_onnx, ort_session

    model = ours_qwen3()
    export_onnx(model, tmp_path / "m.onnx")
    diffs = check_onnx(model, ort_session(tmp_path / "m.onnx"), atol=1e-4)
    assert diffs["prefill_max_abs_diff"] < 1e-4 and diffs["decode_max_abs_diff"] < 1e-4
