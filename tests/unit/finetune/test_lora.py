"""LoRA: injection, only adapters train, merge, PEFT-format parity, QLoRA-style quantized base."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.errors import ConfigError, InputError
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
from lmforge.model import quant
from lmforge.model.config import preset_config
from lmforge.model.int4pack import int4pack_layout
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


@pytest.mark.parametrize(
    ("targets", "rslora"),
    [
        (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False),
        (["q_proj", "v_proj"], True),  # PEFT's default Llama targets: k of the fused qkv unadapted
    ],
)
def test_a_hugging_face_peft_adapter_loads_exactly(tmp_path, targets, rslora):
    """HF PEFT trains q/k/v and gate/up each with its own A: our fused linears must reproduce
    every part's update, with PEFT's scaling (rslora: alpha / sqrt(r))."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lmforge.model.convert import save_pretrained

    save_pretrained(_model(), tmp_path / "base")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    torch.manual_seed(4)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora,
                             init_lora_weights=False)  # fmt: skip  # random A and B
    peft_model = peft.get_peft_model(hf, config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    ours = load_peft_adapter(_model(), tmp_path / "adapter")
    qkv = ours.blocks[0].attn.qkv
    assert qkv.r == (4 * len({"q_proj", "k_proj", "v_proj"} & set(targets)))  # A's stacked
    with torch.no_grad():
        theirs = peft_model(IDX).logits
        got = ours(IDX)
        with peft_model.disable_adapter():
            assert (peft_model(IDX).logits - theirs).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(got, theirs, atol=1e-4, rtol=0)
    if len(targets) > 2:  # r=12 on qkv, 4 elsewhere: one adapter_config.json cannot say so
        with pytest.raises(ConfigError, match="several ranks"):
            save_peft_adapter(ours, tmp_path / "again")
        return
    save_peft_adapter(ours, tmp_path / "again")  # one rank (qkv's 8): PEFT reads it back alike
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    again = peft.PeftModel.from_pretrained(hf, tmp_path / "again").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(IDX).logits, theirs, atol=1e-4, rtol=0)


def test_an_adapter_that_cannot_load_exactly_is_refused(tmp_path):
    model = inject(_model(), LoraConfig(r=4, alpha=8))
    save_peft_adapter(model, tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(InputError, match=r"use_dora \(DoRA\).*merge_and_unload"):
        load_peft_adapter(_model(), tmp_path / "adapter")
    config_file.write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(InputError, match=r"do not have its adapter_config\.json's rank r=8"):
        load_peft_adapter(_model(), tmp_path / "adapter")
    config_file.write_text(json.dumps(config))
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = {k: t.clone() for k, t in load_file(weights).items()}  # not the file's pages
    weights.write_bytes(b"not safetensors")
    with pytest.raises(InputError, match=r"adapter_model\.safetensors is not a readable"):
        load_peft_adapter(_model(), tmp_path / "adapter")
    save_file(tensors, weights)
    no_hf_family = Transformer(preset_config("micro", post_norm=True))
    with pytest.raises(InputError, match="no Hugging Face equivalent"):
        load_peft_adapter(no_hf_family, tmp_path / "adapter")
    key = next(k for k in tensors if k.endswith("lora_B.weight")).replace(".weight", ".bias")
    save_file({**tensors, key: torch.zeros(3)}, weights)  # PEFT's lora_bias
    with pytest.raises(
        InputError, match=r"weights hold .*lora_B\.bias, which is not a LoRA A or B"
    ):
        load_peft_adapter(_model(), tmp_path / "adapter")
    embedding = "base_model.model.model.embed_tokens.lora_embedding_A"
    save_file({**tensors, embedding: torch.zeros(4, 256)}, weights)
    with pytest.raises(InputError, match=r"adapts an embedding \(.*embed_tokens"):
        load_peft_adapter(_model(), tmp_path / "adapter")


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


needs_int4_kernel = pytest.mark.skipif(
    int4pack_layout() is None, reason="this torch has no working CPU int4 kernel (torch < 2.6)"
)


def _grads(model, idx):
    """(logits, input embeddings' gradient, LoRA parameters' gradients) of a small loss."""
    emb = model.tok_emb(idx).detach().requires_grad_(True)
    # the blocks' input as a leaf whose gradient we read
    hook = model.tok_emb.register_forward_hook(lambda module, args, out: emb)
    logits = model(idx)
    hook.remove()
    logits.logsumexp(-1).mean().backward()
    named = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), emb.grad, named


@needs_int4_kernel
def test_qlora_int4_base_trains_through_the_kernel_with_the_dequantized_paths_grads(monkeypatch):
    def qlora(kernel: bool):
        model = _model()
        with monkeypatch.context() as m:
            if not kernel:  # the base in our own layout, dequantized every forward
                m.setattr(quant, "kernel_packable", lambda *args: False)
            inject(model, LoraConfig(r=4, quantize="int4", group_size=32))
        _randomize_adapters(model)
        return model

    kernel, dequantized = qlora(True), qlora(False)
    bases = [m.base for m in lora_modules(kernel).values()]
    assert bases and all(b.kernel_packed and not hasattr(b, "codes") for b in bases)
    assert not any(m.base.kernel_packed for m in lora_modules(dequantized).values())
    with torch.profiler.profile() as prof:
        got = _grads(kernel, IDX)
    calls = [e.name for e in prof.events()]
    assert calls.count("aten::_weight_int4pack_mm_for_cpu") == len(bases)  # grad enabled too
    ref = _grads(dequantized, IDX)
    # bf16 activations and bf16 scales in the kernel's base: within 2% of each tensor's range
    assert got[2].keys() == ref[2].keys() and all("lora_" in n for n in got[2])
    pairs = [(got[0], ref[0]), (got[1], ref[1]), *((got[2][n], ref[2][n]) for n in ref[2])]
    for a, b in pairs:  # at most 1.1% here (torch 2.13)
        assert a.abs().sum() > 0 and (a - b).abs().max() <= 0.02 * b.abs().max()


@needs_int4_kernel
def test_qlora_int4_base_of_rows_the_kernel_lacks_gives_the_inputs_exact_gradient():
    torch.manual_seed(0)
    layer = LoRALinear(QuantLinear.from_linear(torch.nn.Linear(64, 50), "int4", 32), 4, 8.0)
    assert layer.base.kernel_packed and layer.base.int4pack.shape[0] == 64  # padded rows
    x = torch.randn(3, 64, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    weight = layer.base.weight + layer.delta_weight()  # (50, 64), the base's bf16 scales
    assert y.shape == (3, 50)
    assert torch.allclose(x.grad, grad @ weight.detach(), rtol=1e-5, atol=1e-5)
    assert layer.lora_B.weight.grad.abs().sum() > 0


QLORA_CHECKPOINT = """
import sys, torch
from lmforge.finetune.lora import LoraConfig, inject, lora_modules
from lmforge.model.config import preset_config
from lmforge.model.int4pack import int4pack_layout
from lmforge.model.transformer import Transformer
from lmforge.train.checkpoint import save_checkpoint
model = inject(Transformer(preset_config("micro")), LoraConfig(r=4, quantize="int4"))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
save_checkpoint(sys.argv[1], 1, model, optimizer)
bases = {n: m.base.weight for n, m in lora_modules(model).items()}  # read in its own layout
torch.save(bases, sys.argv[1] + "/bases.pt")
print(tuple(int4pack_layout()), all(m.base.kernel_packed for m in lora_modules(model).values()))
"""


@needs_int4_kernel
def test_a_qlora_checkpoint_resumes_on_a_cpu_of_another_int4_layout(tmp_path):
    from lmforge.train.checkpoint import load_checkpoint

    # torch packs int4 per CPU vector width; ATen's ATEN_CPU_CAPABILITY=default gives the
    # unvectorized layout in a fresh process, as on a CPU without AVX2 (its random numbers
    # differ too: the child's weights are compared, not regenerated)
    if tuple(int4pack_layout()) == (32, False):
        pytest.skip("this process already packs int4 in the unvectorized layout")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    script = [sys.executable, "-c", QLORA_CHECKPOINT, str(tmp_path)]
    out = subprocess.run(script, env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "(32, False) True", out.stderr
    model = inject(_model(), LoraConfig(r=4, quantize="int4"))  # its own base, replaced
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    load_checkpoint(tmp_path / "step_1", model, optimizer)
    bases = torch.load(tmp_path / "bases.pt")
    assert bases.keys() == lora_modules(model).keys()
    for name, module in lora_modules(model).items():
        assert module.base.kernel_packed and torch.equal(module.base.weight, bases[name])


@needs_int4_kernel
def test_qlora_int4_exports_hold_no_kernel_bytes(tmp_path):
    from safetensors.torch import load_file

    from lmforge.model.convert import save_pretrained

    save_pretrained(_model(), tmp_path / "plain")
    model = inject(_model(), LoraConfig(r=4, quantize="int4"))
    _randomize_adapters(model)
    qkv = model.blocks[0].attn.qkv
    assert qkv.base.kernel_packed
    want = (qkv.base.weight + qkv.delta_weight()).detach()  # the base as it trained: bf16 scales
    save_peft_adapter(model, tmp_path / "adapter")
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert adapter and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in adapter)
    save_pretrained(merge(model), tmp_path / "merged")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in merged.items()} == {
        k: (v.shape, v.dtype) for k, v in plain.items()
    }
    assert torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], want[:64])
