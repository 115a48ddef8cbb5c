"""Mixture of experts (model/moe.py): routing as transformers' Mixtral block, the router losses
against transformers' load_balancing_loss_func, training through the one loop, LoRA on experts."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.model.config import ModelConfig, preset_config
from lmforge.model.moe import load_balancing_loss, moe_layers, z_loss
from lmforge.model.transformer import Transformer
from lmforge.train.config import TrainConfig
from lmforge.train.loader import TokenWindows
from lmforge.train.loop import train
from lmforge.train.pretrain import lm_loss

from ..train.helpers import bigram_tokens, make_ctx

transformers = pytest.importorskip("transformers")
from transformers.models.mixtral import modeling_mixtral  # noqa: E402


def _moe(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(preset_config("micro-moe", vocab_size=32, **overrides))


def _router_logits(model: Transformer, idx: torch.Tensor, **kw) -> tuple[torch.Tensor, ...]:
    """Each layer's router logits (N, E) during one forward of model (kw: forward's)."""
    seen: list[torch.Tensor] = []
    hooks = [
        m.router.register_forward_hook(lambda *a: seen.append(a[2])) for m in moe_layers(model)
    ]
    model(idx, **kw)
    for h in hooks:
        h.remove()
    return tuple(seen)


def test_moe_block_matches_transformers_mixtral_block():
    """Our token-gather dispatch = MixtralSparseMoeBlock's loop over experts, same weights."""
    torch.manual_seed(0)
    cfg = preset_config("micro-moe", num_experts=6, num_experts_per_tok=2)
    ours = Transformer(cfg).blocks[0].mlp
    hf_cfg = transformers.MixtralConfig(
        hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate_size, num_local_experts=6,
        num_experts_per_tok=2,
    )  # fmt: skip
    hf = modeling_mixtral.MixtralSparseMoeBlock(hf_cfg)
    with torch.no_grad():
        hf.gate.weight.copy_(ours.router.weight)
        for e, expert in enumerate(ours.experts):
            hf.experts.gate_up_proj[e].copy_(expert.fc.weight)
            hf.experts.down_proj[e].copy_(expert.proj.weight)
    x = torch.randn(3, 11, cfg.n_embd)
    torch.testing.assert_close(ours(x), hf(x), atol=1e-5, rtol=1e-5)


def test_topk_weights_are_raw_without_norm_topk_prob():
    """Qwen-MoE style (norm_topk_prob=False): the output is the renormalised one scaled by the
    chosen experts' softmax mass, token by token."""
    x = torch.randn(2, 5, 64)
    normed = _moe(num_experts_per_tok=2).blocks[0].mlp
    raw = _moe(num_experts_per_tok=2, norm_topk_prob=False).blocks[0].mlp
    mass = normed.router(x).softmax(-1).topk(2, dim=-1).values.sum(-1, keepdim=True)
    torch.testing.assert_close(raw(x), normed(x) * mass, atol=1e-6, rtol=1e-5)


def test_every_expert_weight_gets_a_gradient_only_from_its_tokens():
    model = _moe()
    model.train()
    idx = torch.randint(0, 32, (2, 16))
    model(idx, labels=idx).backward()
    layer = model.blocks[0].mlp
    used = layer.stats.assigned > 0
    for e, expert in enumerate(layer.experts):
        has_grad = expert.fc.weight.grad is not None and expert.fc.weight.grad.abs().sum() > 0
        assert has_grad == bool(used[e])
    assert layer.router.weight.grad.abs().sum() > 0  # through the weights and the aux loss


def test_aux_loss_equals_transformers_load_balancing_loss():
    model = _moe(num_experts_per_tok=2)
    idx = torch.randint(0, 32, (3, 20))
    logits = _router_logits(model, idx)
    expected = modeling_mixtral.load_balancing_loss_func(logits, 4, 2)
    torch.testing.assert_close(load_balancing_loss(moe_layers(model)), expected)
    lse = torch.cat([torch.logsumexp(g.float(), -1) for g in logits])
    torch.testing.assert_close(z_loss(moe_layers(model)), lse.square().mean())


@pytest.mark.parametrize("padding", ["doc_ids", "pad_mask"])
def test_padding_is_left_out_of_the_router_statistics_as_transformers_does(padding):
    """A packed row's tail (doc_ids -1, as SFT packs) or a padded batch's pad_mask 0: the losses
    equal transformers' load_balancing_loss_func given that attention_mask, and differ from the
    ones counting the pads (so the test would see pads leaking in)."""
    model = _moe(num_experts_per_tok=2, router_z_loss_coef=0.1)
    idx = torch.randint(0, 32, (3, 20))
    real = torch.ones(3, 20, dtype=torch.long)
    real[0, 12:], real[2, 5:] = 0, 0
    if padding == "doc_ids":
        kw = {"doc_ids": torch.where(real.bool(), 0, -1)}
    else:
        kw = {"pad_mask": real}
    logits = _router_logits(model, idx, **kw)
    expected = modeling_mixtral.load_balancing_loss_func(logits, 4, 2, attention_mask=real)
    layers = moe_layers(model)
    torch.testing.assert_close(load_balancing_loss(layers), expected)
    keep = real.flatten().bool()
    lse = torch.cat([torch.logsumexp(g.float(), -1)[keep] for g in logits])
    torch.testing.assert_close(z_loss(layers), lse.square().mean())
    assert sum(m.stats.n_tokens for m in layers) == 2 * int(real.sum())
    with_pads = modeling_mixtral.load_balancing_loss_func(logits, 4, 2)
    assert not torch.allclose(expected, with_pads)


def test_a_batch_of_padding_only_adds_no_router_loss():
    model = _moe(router_z_loss_coef=0.1).train()
    idx = torch.randint(0, 32, (2, 8))
    model(idx, doc_ids=torch.full((2, 8), -1))
    layers = moe_layers(model)
    assert load_balancing_loss(layers).item() == 0 and z_loss(layers).item() == 0


def test_training_loss_adds_router_losses_and_eval_does_not():
    cfg = dict(router_aux_loss_coef=0.5, router_z_loss_coef=0.1)
    model = _moe(**cfg)
    idx = torch.randint(0, 32, (2, 16))
    with torch.no_grad():
        model.eval()
        plain = model(idx, labels=idx)
        model.train()
        total = model(idx, labels=idx)
    layers = moe_layers(model)
    extra = 0.5 * load_balancing_loss(layers) + 0.1 * z_loss(layers)
    torch.testing.assert_close(total, plain + extra)


def test_config_errors_name_the_field():
    base = dict(vocab_size=32, n_layer=1, n_head=2, n_kv_head=2, n_embd=16,
                intermediate_size=32, block_size=16)  # fmt: skip
    with pytest.raises(ConfigError, match="num_experts_per_tok=5"):
        ModelConfig(**base, num_experts=4, num_experts_per_tok=5)
    with pytest.raises(ConfigError, match="SwiGLU experts"):
        ModelConfig(**base, num_experts=4, mlp="gelu")
    with pytest.raises(ConfigError, match="num_experts must be >= 0"):
        ModelConfig(**base, num_experts=-1)
    with pytest.raises(ConfigError, match=r"router_aux_loss_coef must be >= 0 .*got -1.0"):
        ModelConfig(**base, num_experts=4, router_aux_loss_coef=-1.0)
    with pytest.raises(ConfigError, match=r"router_z_loss_coef must be >= 0 .*got -0.5"):
        ModelConfig(**base, num_experts=4, router_z_loss_coef=-0.5)


def test_flops_count_only_the_active_experts():
    """Four experts top-2 cost what two experts top-2 cost, plus the wider routers' 6 FLOPs each."""
    two = _moe(num_experts=2, num_experts_per_tok=2).flops_per_token(16)
    router_rows = 2 * 2 * 64  # 2 more experts x 2 layers x n_embd
    assert _moe(num_experts=4, num_experts_per_tok=2).flops_per_token(16) == two + 6 * router_rows


def test_loop_trains_a_moe_and_logs_balance(tmp_path):
    tokens = bigram_tokens(4000)
    cfg = TrainConfig(max_steps=12, micro_batch_size=4, seq_len=16, warmup_steps=0, eval_every=0,
                      ckpt_every=0, device="cpu", lr=1e-2, log_every=1)  # fmt: skip
    result = train(_moe(), lm_loss, TokenWindows(tokens, 16, 4, seed=0), cfg, make_ctx(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    fracs = [rows[-1][f"moe_expert_frac_{e}"] for e in range(4)]
    assert sum(fracs) == pytest.approx(1.0) and min(fracs) > 0
    assert rows[-1]["moe_aux_loss"] >= 2.0 - 1e-4  # k = 2 is its floor (perfect balance)
    assert rows[-1]["moe_max_load"] >= 1.0
    assert result.step == 12


def test_lora_on_experts_trains_only_adapters(tmp_path):
    from lmforge.finetune.config import LoraConfig
    from lmforge.finetune.lora import inject, lora_modules

    model = _moe()
    inject(
        model, LoraConfig(r=4, alpha=8, targets=["attn.qkv", "*.experts.*.fc", "*.experts.*.proj"])
    )
    adapters = lora_modules(model)
    assert "blocks.0.mlp.experts.3.fc" in adapters and "blocks.1.mlp.router" not in adapters
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens = bigram_tokens(4000)
    cfg = TrainConfig(max_steps=8, micro_batch_size=4, seq_len=16, warmup_steps=0, eval_every=0,
                      ckpt_every=0, device="cpu", lr=1e-2, log_every=1)  # fmt: skip
    train(model, lm_loss, TokenWindows(tokens, 16, 4, seed=0), cfg, make_ctx(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed <= trainable  # the frozen base (router and expert weights too) never moves
    assert any(".experts." in n and "lora_B" in n for n in changed)


def test_compiled_decoding_runs_the_experts_eagerly_and_equals_recomputing(monkeypatch):
    """The compiled decoding step (generate compile=on) leaves MoE.forward to eager: compiled,
    dynamo recompiled the dispatch for each new spread of tokens over experts (here it would
    pass recompile_limit=2 and raise)."""
    from lmforge.model import compiled_decode
    from lmforge.model.generate import generate

    monkeypatch.setattr(compiled_decode, "BACKEND", "aot_eager")  # seconds, not inductor's
    torch._dynamo.reset()
    model = _moe(init_std=0.2).eval()
    idx = torch.randint(0, 32, (3, 7))
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        compiled = generate(model, idx, 12, greedy=True, compile="on")
    assert torch.equal(compiled, generate(model, idx, 12, greedy=True, use_cache=False))


def test_router_statistics_are_kept_by_training_forwards_only():
    """An eval-mode forward (generation, validation) computes none and drops the last ones, so
    nothing reads a training step's routing as an eval batch's."""
    model = _moe()
    idx = torch.randint(0, 32, (2, 8))
    model.train()(idx)
    assert all(m.stats is not None and m.stats.n_tokens == 16 for m in model.moe_layers)
    with torch.no_grad():
        model.eval()(idx)
    assert all(m.stats is None for m in model.moe_layers)
    assert model.moe_layers == moe_layers(model) and len(model.moe_layers) == 2
