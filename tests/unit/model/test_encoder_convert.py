"""BERT/RoBERTa encoders round-trip through transformers: logits equal within 1e-4."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.model.config import preset_config
from lmforge.model.convert import load_pretrained, save_pretrained
from lmforge.model.transformer import Transformer

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
TINY |= dict(intermediate_size=64, max_position_embeddings=40)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere (norm gains near 1, non-zero biases) so no mapping hides."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            gain = p.ndim == 1 and "norm" in name.lower() and name.endswith("weight")
            p.copy_(1 + 0.1 * noise if gain else 0.08 * noise)
    return model.eval()


def ids(vocab: int, shape=(2, 12), low: int = 3) -> torch.Tensor:
    """Token ids that avoid the pad ids (RoBERTa derives positions from them)."""
    return torch.randint(low, vocab, shape, generator=torch.Generator().manual_seed(1))


def our_logits(model: Transformer, idx: torch.Tensor, pad_mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(idx, pad_mask=pad_mask)


@pytest.mark.parametrize("offset", [0, 2])
def test_export_loads_as_masked_lm_with_equal_logits(tmp_path, offset):
    model = randomize(Transformer(preset_config("bert-micro", pos_offset=offset)))
    save_pretrained(model, tmp_path)
    hf_cfg = json.loads((tmp_path / "config.json").read_text())
    assert hf_cfg["architectures"] == ["RobertaForMaskedLM" if offset else "BertForMaskedLM"]
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    idx = ids(model.config.vocab_size)
    pad = torch.ones_like(idx)
    pad[1, 8:] = 0  # right padding: real tokens must not see it
    with torch.no_grad():
        theirs = hf(idx, attention_mask=pad).logits
    ours = our_logits(model, idx, pad)
    real = pad.bool()
    assert torch.allclose(ours[real], theirs[real], atol=1e-4)
    # the padded row's real tokens equal the same row run alone without its padding
    alone = our_logits(model, idx[1:, :8])
    assert torch.allclose(ours[1, :8], alone[0], atol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_import_random_hf_masked_lm_and_finetune(tmp_path, kind):
    if kind == "bert":
        config = transformers.BertConfig(**TINY, hidden_act="gelu")
        hf = transformers.BertForMaskedLM(config)
    else:
        config = transformers.RobertaConfig(**TINY, pad_token_id=1, type_vocab_size=1)
        hf = transformers.RobertaForMaskedLM(config)
    randomize(hf)
    hf.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    assert not model.config.causal and model.config.mlm_head
    idx = ids(TINY["vocab_size"])
    with torch.no_grad():
        theirs = hf(idx).logits
    assert torch.allclose(our_logits(model, idx), theirs, atol=1e-4)
    # a few fine-tuning steps on a fixed masked batch lower its loss
    labels = torch.full_like(idx, -100)
    labels[:, ::3] = idx[:, ::3]
    masked = idx.clone()
    masked[:, ::3] = 4
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(masked, labels=labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_encoder_is_bidirectional_and_decoder_is_not():
    torch.manual_seed(0)
    enc = Transformer(preset_config("bert-micro")).eval()
    dec = Transformer(preset_config("micro-gpt2")).eval()
    idx = ids(256, (1, 10))
    changed = idx.clone()
    changed[0, -1] = (idx[0, -1] + 1) % 256
    with torch.no_grad():
        # changing the last token moves the encoder's first position, never the decoder's
        assert not torch.allclose(enc(idx)[0, 0], enc(changed)[0, 0])
        assert torch.equal(dec(idx)[0, 0], dec(changed)[0, 0])


def test_bare_encoder_exports_as_base_model(tmp_path):
    model = randomize(Transformer(preset_config("bert-micro", mlm_head=False)))
    save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["BertModel"]
    hf = transformers.AutoModel.from_pretrained(tmp_path).eval()
    idx = ids(256)
    with torch.no_grad():
        theirs = hf(idx).last_hidden_state
        ours = model.hidden_states(idx)
    assert torch.allclose(ours, theirs, atol=1e-4)
    back = load_pretrained(tmp_path)
    assert not back.config.mlm_head
    with torch.no_grad():
        assert torch.allclose(back.hidden_states(idx), ours, atol=1e-6)


def test_mlm_loss_on_masked_positions_equals_full_cross_entropy():
    torch.manual_seed(0)
    model = Transformer(preset_config("bert-micro"))
    idx = ids(256, (3, 16))
    labels = torch.full_like(idx, -100)
    labels[:, 1::4] = idx[:, 1::4]
    loss = model(idx, labels=labels)
    full = torch.nn.functional.cross_entropy(
        model(idx).flatten(0, 1), labels.flatten(), ignore_index=-100
    )
    assert torch.allclose(loss, full, atol=1e-6)
    loss.backward()  # the head's dense, norm and bias all get gradients
    assert model.mlm_transform.dense.weight.grad.abs().sum() > 0
    assert model.lm_head.bias.grad.abs().sum() > 0


def test_encoder_without_hf_family_refuses_a_biased_head_and_keeps_native_mlm(tmp_path):
    from lmforge.model.convert import ClassifierHead

    model = randomize(Transformer(preset_config("bert-micro", n_kv_head=2)))  # GQA: no HF family
    head = ClassifierHead(torch.zeros(2, 64), ["a", "b"], bias=torch.zeros(2), per_token=True)
    with pytest.raises(
        ConfigError, match="clf: an encoder classifier exports only as BERT/RoBERTa"
    ):
        save_pretrained(model, tmp_path / "clf", classifier=head)
    assert not (tmp_path / "clf").exists()  # refused before anything was written
    save_pretrained(model, tmp_path / "mlm")  # lmforge's own layout round-trips exactly
    idx = ids(256)
    assert torch.equal(our_logits(load_pretrained(tmp_path / "mlm"), idx), our_logits(model, idx))


@pytest.mark.parametrize("preset", ["bert-micro", "bert-tiny", "bart-micro", "bart-tiny"])
def test_presets_are_exactly_the_hf_shapes_they_export_as(preset):
    from lmforge.model.hf_families import FAMILIES, family_for

    cfg = preset_config(preset)
    model_type = family_for(cfg)
    assert model_type == ("bart" if cfg.is_encoder_decoder else "bert")
    family = FAMILIES[model_type]
    hf = family.hf_config(cfg, model_type, family.architecture)
    assert family.to_config(hf) == cfg  # the import builds the preset back, field for field
    # one field off the shared shape and the config no longer claims the family
    assert family_for(preset_config(preset, emb_norm=False)) is None
