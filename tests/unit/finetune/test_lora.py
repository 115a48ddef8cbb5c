"""LoRA: injection, only adapters train, merge, PEFT-format parity, QLoRA-style quantized base."""

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.finetune.lora import (
    LoraConfig,
    LoRALinear,
    inject,
    load_peft_adapter,
    lora_modules,
    merge,
    save_peft_adapter,
    trainable_fraction,
)
from lmforge.model.config import preset_config
from lmforge.model.quant import QuantLinear, dequantize_weight, quantize_weight
from lmforge.model.transformer import Transformer


def _model(preset="micro", seed=0):
    torch.manual_seed(seed)
    return Transformer(preset_config(preset)).eval()


def _randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)


IDX = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))


def test_inject_starts_as_identity_and_freezes_base():
    model = _model()
    before = model(IDX)
    inject(model, LoraConfig(r=4))
    assert torch.allclose(model(IDX), before, atol=1e-6)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(lora_modules(model)) == 2 * 4  # 2 layers x (qkv, attn.proj, mlp.fc, mlp.proj)
    trainable, total = trainable_fraction(model)
    assert 0 < trainable / total < 0.2


def test_targets_must_match_something():
    with pytest.raises(ConfigError, match="match no linear layer"):
        inject(_model(), LoraConfig(targets=["nope"]))
    model = inject(_model(), LoraConfig(targets=["blocks.0.*"]))
    assert sorted(lora_modules(model)) == [
        "blocks.0.attn.proj",
        "blocks.0.attn.qkv",
        "blocks.0.mlp.fc",
        "blocks.0.mlp.proj",
    ]


def test_merge_matches_adapted_outputs():
    model = inject(_model(), LoraConfig(r=4, alpha=8))
    _randomize_adapters(model)
    adapted = model(IDX)
    merge(model)
    assert not lora_modules(model)
    assert torch.allclose(model(IDX), adapted, atol=1e-5)
    assert isinstance(model.blocks[0].attn.qkv, torch.nn.Linear)


def test_a_training_step_moves_only_adapters():
    model = inject(_model(), LoraConfig(r=4)).train()
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(IDX).logsumexp(-1).mean().backward()
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(m.lora_B.weight.abs().sum() > 0 for m in lora_modules(model).values())


@pytest.mark.parametrize("preset", ["micro", "micro-gpt2"])
def test_peft_loads_our_adapter_with_same_outputs(tmp_path, preset):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lmforge.model.convert import save_pretrained

    model = _model(preset)
    save_pretrained(model, tmp_path / "base")
    inject(model, LoraConfig(r=4, alpha=8))
    _randomize_adapters(model)
    save_peft_adapter(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(IDX).logits
        ours = model(IDX)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    # and the adapter changes the outputs, so the comparison is not vacuous
    with peft_model.disable_adapter(), torch.no_grad():
        assert (peft_model(IDX).logits - theirs).abs().max() > 1e-3


def test_adapter_round_trip_through_peft_files(tmp_path):
    model = inject(_model(), LoraConfig(r=4, alpha=8))
    _randomize_adapters(model)
    save_peft_adapter(model, tmp_path / "adapter")
    fresh = load_peft_adapter(_model(), tmp_path / "adapter")
    assert torch.allclose(fresh(IDX), model(IDX), atol=1e-6)


@pytest.mark.parametrize(("kind", "bits", "tol"), [("int8", 8, 0.01), ("int4", 4, 0.15)])
def test_quantized_weight_round_trip(kind, bits, tol):
    w = torch.randn(16, 64)
    codes, scale = quantize_weight(w, bits, group_size=32)
    assert codes.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert codes.numel() == (w.numel() if bits == 8 else w.numel() // 2)
    err = (dequantize_weight(codes, scale, bits, 32) - w).abs().max() / w.abs().max()
    assert err < tol


def test_qlora_trains_adapters_over_a_quantized_base():
    model = _model()
    reference = model(IDX)
    inject(model, LoraConfig(r=4, quantize="int4", group_size=32))
    qkv = model.blocks[0].attn.qkv
    assert isinstance(qkv, LoRALinear) and isinstance(qkv.base, QuantLinear)
    assert not any(p.requires_grad for p in qkv.base.parameters())
    out = model(IDX)
    assert (out - reference).abs().max() < 0.5 * reference.abs().max()  # close, not equal
    out.logsumexp(-1).mean().backward()
    assert qkv.lora_B.weight.grad is not None and qkv.lora_B.weight.grad.abs().sum() > 0
    merge(model)
    assert isinstance(model.blocks[0].attn.qkv, torch.nn.Linear)
