"""Hugging Face import/export: logits must match transformers on tiny random models."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.errors import InputError
from lmforge.model.config import preset_config
from lmforge.model.convert import (
    ClassifierHead,
    hf_config_to_model_config,
    load_classifier,
    load_pretrained,
    model_display_name,
    save_pretrained,
)
from lmforge.model.transformer import Transformer

transformers = pytest.importorskip("transformers")

VOCAB = 300
SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
SMALL |= dict(intermediate_size=96, max_position_embeddings=64)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere (norm gains near 1, non-zero biases) so no mapping hides."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_gain = p.ndim == 1 and ("norm" in name or "ln" in name) and name.endswith("weight")
            p.copy_(1 + 0.1 * noise if is_gain else 0.08 * noise)
    return model.eval()


def hf_logits(model_dir, idx: torch.Tensor) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return hf(idx).logits


HF_MODELS = {
    "llama-gqa": lambda: transformers.LlamaConfig(**SMALL, num_key_value_heads=2),
    "llama-bias-tied": lambda: transformers.LlamaConfig(
        **SMALL, attention_bias=True, mlp_bias=True, tie_word_embeddings=True
    ),
    "llama3-rope": lambda: transformers.LlamaConfig(
        **SMALL,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=10000.0,
            factor=4.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),
    "qwen2-tied": lambda: transformers.Qwen2Config(
        **SMALL, num_key_value_heads=2, tie_word_embeddings=True
    ),
    "mistral-window": lambda: transformers.MistralConfig(
        **SMALL, num_key_value_heads=1, sliding_window=6
    ),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "gpt2-exact-gelu": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, activation_function="gelu"
    ),
}


@pytest.mark.parametrize("kind", list(HF_MODELS))
def test_import_hf_checkpoint_matches_transformers(kind, tmp_path):
    torch.manual_seed(0)
    hf = randomize(transformers.AutoModelForCausalLM.from_config(HF_MODELS[kind]()))
    hf.save_pretrained(tmp_path)
    idx = torch.randint(0, VOCAB, (2, 40))
    ours = load_pretrained(tmp_path)
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx)
    assert (got - expected).abs().max().item() <= 1e-4
    assert not ours.training


OUR_MODELS = {
    "llama-tied-gqa": ("micro", {}, "LlamaForCausalLM"),
    "llama-untied-mha": ("micro", dict(tie_embeddings=False, n_kv_head=4), "LlamaForCausalLM"),
    "llama-bias": ("micro", dict(bias=True, dropout=0.1, init_std=0.01), "LlamaForCausalLM"),
    "qwen2": ("micro", dict(attn_bias=True), "Qwen2ForCausalLM"),
    "mistral": ("micro", dict(sliding_window=5, tie_embeddings=False), "MistralForCausalLM"),
    "mixtral": ("micro-moe", dict(tie_embeddings=False), "MixtralForCausalLM"),
    "qwen3-moe": ("micro-moe", dict(qk_norm=True, head_dim=24), "Qwen3MoeForCausalLM"),
    "qwen3-moe-raw-topk": (
        "micro-moe",
        dict(qk_norm=True, norm_topk_prob=False, tie_embeddings=False),
        "Qwen3MoeForCausalLM",
    ),
    "gpt2-tied": ("micro-gpt2", {}, "GPT2LMHeadModel"),
    "gpt2-untied": ("micro-gpt2", dict(tie_embeddings=False, dropout=0.1), "GPT2LMHeadModel"),
    "gpt2-exact-gelu": ("micro-gpt2", dict(mlp="gelu_exact"), "GPT2LMHeadModel"),
}


@pytest.mark.parametrize("kind", list(OUR_MODELS))
def test_export_loads_in_transformers_with_same_logits(kind, tmp_path):
    preset, overrides, architecture = OUR_MODELS[kind]
    model = randomize(Transformer(preset_config(preset, vocab_size=VOCAB, **overrides)))
    save_pretrained(model, tmp_path, extra_config={"eos_token_id": 2})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [architecture] and config["eos_token_id"] == 2
    idx = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        expected = model(idx)
    assert (hf_logits(tmp_path, idx) - expected).abs().max().item() <= 1e-4
    back = load_pretrained(tmp_path)
    assert back.config == model.config
    torch.testing.assert_close(back(idx), expected, atol=0, rtol=0)
    assert (back.lm_head.weight is back.tok_emb.weight) == model.config.tie_embeddings


PAD = 1
LABELS = ["neg", "neu", "pos"]


def right_padded(lengths: list[int], seed: int = 0) -> torch.Tensor:
    """Rows of random ids right-padded with PAD; the pad id also occurs inside the texts."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.full((len(lengths), max(lengths)), PAD)
    for r, n in enumerate(lengths):
        idx[r, :n] = torch.randint(2, VOCAB, (n,), generator=g)
    idx[0, 2] = PAD
    return idx


def pooled_logits(model: Transformer, score: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Class logits at the rightmost non-PAD position (transformers' pooling written out)."""
    last = ((idx != PAD) * torch.arange(idx.shape[1])).argmax(-1)
    with torch.no_grad():
        return model.hidden_states(idx)[torch.arange(len(idx)), last] @ score.T


CLASSIFIERS = {
    "llama-tied": ("micro", {}, "LlamaForSequenceClassification"),
    "llama-untied": ("micro", dict(tie_embeddings=False), "LlamaForSequenceClassification"),
    "qwen2": ("micro", dict(attn_bias=True), "Qwen2ForSequenceClassification"),
    "mistral": ("micro", dict(sliding_window=5), "MistralForSequenceClassification"),
    "gpt2-tied": ("micro-gpt2", {}, "GPT2ForSequenceClassification"),
    "gpt2-untied": ("micro-gpt2", dict(tie_embeddings=False), "GPT2ForSequenceClassification"),
}


@pytest.mark.parametrize("kind", list(CLASSIFIERS))
def test_classifier_export_loads_in_transformers_with_same_logits(kind, tmp_path):
    preset, overrides, architecture = CLASSIFIERS[kind]
    model = randomize(Transformer(preset_config(preset, vocab_size=VOCAB, **overrides)))
    score = 0.1 * torch.randn(len(LABELS), model.config.n_embd)
    head = ClassifierHead(score, LABELS)
    save_pretrained(model, tmp_path, extra_config={"pad_token_id": PAD}, classifier=head)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [architecture] and config["pad_token_id"] == PAD
    assert config["id2label"] == {"0": "neg", "1": "neu", "2": "pos"}
    assert config["label2id"] == {"neg": 0, "neu": 1, "pos": 2} and config["num_labels"] == 3
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    hf, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert hf.config.id2label == dict(enumerate(LABELS)) and hf.config.pad_token_id == PAD
    idx = right_padded([12, 7, 20, 1])
    with torch.no_grad():
        expected = hf.eval()(idx).logits
    assert (pooled_logits(model, score, idx) - expected).abs().max().item() <= 1e-4
    back, back_head = load_pretrained(tmp_path), load_classifier(tmp_path)
    assert back_head.labels == LABELS and torch.equal(back_head.weight, score)
    with torch.no_grad():
        torch.testing.assert_close(back.hidden_states(idx), model.hidden_states(idx))
    if not model.config.tie_embeddings:  # a classifier has no LM head to restore
        assert not back.lm_head.weight.any()


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2-tied", "gpt2"])
def test_hf_classifier_imports_with_same_logits(kind, tmp_path):
    config = HF_MODELS[kind]()
    config.pad_token_id = PAD
    config.id2label, config.label2id = dict(enumerate(LABELS)), {n: i for i, n in enumerate(LABELS)}
    hf = randomize(transformers.AutoModelForSequenceClassification.from_config(config))
    hf.save_pretrained(tmp_path)
    idx = right_padded([9, 16, 3])
    with torch.no_grad():
        expected = hf(idx).logits
    ours, head = load_pretrained(tmp_path), load_classifier(tmp_path)
    assert head.labels == LABELS
    assert (pooled_logits(ours, head.weight, idx) - expected).abs().max().item() <= 1e-4


def test_hf_classifier_without_id2label_gets_default_names(tmp_path):
    hf = transformers.AutoModelForSequenceClassification.from_config(HF_MODELS["gpt2"]())
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("id2label", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_classifier(tmp_path).labels == ["LABEL_0", "LABEL_1"]


def test_native_layout_classifier_round_trips(tmp_path):
    model = randomize(Transformer(preset_config("micro", pos="learned", norm="layernorm")))
    head = ClassifierHead(torch.randn(2, model.config.n_embd), ["no", "yes"])
    save_pretrained(model, tmp_path, classifier=head)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LmforgeForSequenceClassification"]
    idx = torch.randint(0, 256, (1, 10))
    torch.testing.assert_close(load_pretrained(tmp_path)(idx), model(idx), atol=0, rtol=0)
    assert load_classifier(tmp_path).labels == ["no", "yes"]
    save_pretrained(model, tmp_path / "lm")
    assert load_classifier(tmp_path / "lm") is None


def test_config_without_hf_equivalent_round_trips_in_native_layout(tmp_path):
    cfg = preset_config("micro", pos="learned", norm="layernorm")  # no HF family has this mix
    model = randomize(Transformer(cfg))
    save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "lmforge"
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")  # tied: stored once
    idx = torch.randint(0, 256, (1, 10))
    torch.testing.assert_close(load_pretrained(tmp_path)(idx), model(idx), atol=0, rtol=0)


def test_sharded_checkpoint_and_bf16_load(tmp_path):
    hf = randomize(transformers.AutoModelForCausalLM.from_config(HF_MODELS["llama-gqa"]()))
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    idx = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        expected = hf(idx).logits
    assert (load_pretrained(tmp_path)(idx) - expected).abs().max().item() <= 1e-4
    half = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.tok_emb.weight.dtype == torch.bfloat16
    assert (half(idx).float() - expected).abs().max().item() < 0.1


def test_gpt2_names_without_transformer_prefix(tmp_path):
    """The original gpt2 checkpoint stores body tensors without the 'transformer.' prefix."""
    hf = randomize(transformers.AutoModelForCausalLM.from_config(HF_MODELS["gpt2"]()))
    hf.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()},
              tmp_path / "model.safetensors")  # fmt: skip
    idx = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert (load_pretrained(tmp_path)(idx) - hf(idx).logits).abs().max().item() <= 1e-4


class Payload:
    """Stands in for arbitrary code inside a pickle."""


def test_bin_checkpoints_load_only_plain_tensors(tmp_path):
    model = randomize(Transformer(preset_config("micro", vocab_size=VOCAB)))
    save_pretrained(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    idx = torch.randint(0, VOCAB, (1, 8))
    torch.testing.assert_close(load_pretrained(tmp_path)(idx), model(idx))
    torch.save({**tensors, "payload": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(InputError, match="does not unpickle"):
        load_pretrained(tmp_path)


def test_bad_inputs_are_reported_in_one_line(tmp_path):
    with pytest.raises(InputError, match=r"config\.json not found"):
        load_pretrained(tmp_path)
    with pytest.raises(InputError, match="supported: llama, mistral, qwen2, gpt2, bert, roberta"):
        hf_config_to_model_config({"model_type": "t5"})
    with pytest.raises(InputError, match="activation_function='relu'"):
        hf_config_to_model_config(HF_MODELS["gpt2"]().to_dict() | {"activation_function": "relu"})
    model = Transformer(preset_config("micro", vocab_size=VOCAB))
    save_pretrained(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    missing = re.escape(f"{tmp_path}: checkpoint is missing tensor 'model.layers.1.mlp.up_proj")
    with pytest.raises(InputError, match=f"^{missing}"):  # the directory named first
        load_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(InputError, match=r"no model\.safetensors"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "foo",}')
    with pytest.raises(InputError, match=r"config\.json is not valid JSON \(line 1 column 22"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "foo"}')
    unsupported = re.escape(f"{tmp_path}: config.json model_type 'foo' is not supported")
    with pytest.raises(InputError, match=f"^{unsupported}"):  # which model's config.json
        load_pretrained(tmp_path)


def test_model_display_name_is_the_stage_for_a_final_dir(tmp_path, monkeypatch):
    final = tmp_path / "runs" / "q" / "sft" / "final"
    final.mkdir(parents=True)
    assert model_display_name(final) == "sft"
    assert model_display_name(tmp_path / "mine") == "mine"
    monkeypatch.chdir(final)  # a relative "." or "final" still names the stage
    assert model_display_name(".") == "sft"
    monkeypatch.chdir(final.parent)
    assert model_display_name("final") == "sft"


def test_a_malformed_shard_index_or_module_list_names_the_file(tmp_path):
    from lmforge.model.convert.files import read_tensor, resolve_model_dir

    model = Transformer(preset_config("micro", vocab_size=VOCAB))
    save_pretrained(model, tmp_path)
    shard = "model-00001-of-00001.safetensors"
    (tmp_path / "model.safetensors").rename(tmp_path / shard)
    index = tmp_path / "model.safetensors.index.json"
    names = list(load_file(tmp_path / shard))
    index.write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(names, shard)}))
    idx = torch.randint(0, VOCAB, (1, 8))
    torch.testing.assert_close(load_pretrained(tmp_path)(idx), model(idx), atol=0, rtol=0)
    assert torch.equal(read_tensor(tmp_path, names[0]), load_file(tmp_path / shard)[names[0]])
    index.write_text('{"weight_map": {"a": ')
    bad = re.escape(f"{index} is not valid JSON (line 1 column 22: Expecting value)")
    with pytest.raises(InputError, match=f"^{bad}.*save the model again"):
        load_pretrained(tmp_path)
    index.write_text('{"metadata": {}}')
    with pytest.raises(InputError, match=r"index\.json has no weight_map of tensor name -> shard"):
        read_tensor(tmp_path, names[0])
    (tmp_path / "modules.json").write_text('[{"type": ')  # sentence-transformers' module list
    with pytest.raises(InputError, match=r"modules\.json is not valid JSON \(line 1 column 11"):
        resolve_model_dir(tmp_path)  # where every command finds the model a path stands for
