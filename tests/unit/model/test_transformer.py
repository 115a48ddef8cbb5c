"""The Transformer against independent references: naive attention, per-document runs, no-cache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError, InputError
from lmforge.model.config import PRESETS, ModelConfig, preset_config
from lmforge.model.generate import KVCache
from lmforge.model.transformer import Transformer, attention_mask, doc_positions, pad_positions

STYLES = ["micro", "micro-gpt2"]


def make(name: str = "micro", seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(preset_config(name, **overrides)).eval()


def naive_attention(attn, x: torch.Tensor, cos, sin, window: int | None = None) -> torch.Tensor:
    """Attention written out by hand: explicit rotary, repeated kv heads, masked softmax."""
    B, T, _ = x.shape
    nh, nkv, hd = attn.n_head, attn.n_kv_head, attn.head_dim
    q, k, v = attn.qkv(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
    q = q.view(B, T, nh, hd).transpose(1, 2)
    k = k.view(B, T, nkv, hd).transpose(1, 2).repeat_interleave(nh // nkv, dim=1)
    v = v.view(B, T, nkv, hd).transpose(1, 2).repeat_interleave(nh // nkv, dim=1)

    def rot(t):
        half = hd // 2
        out = torch.empty_like(t)
        for i in range(half):  # pair (i, i + half) rotated by angle freq_i * pos
            c, s = cos[:, i], sin[:, i]
            out[..., i] = t[..., i] * c - t[..., i + half] * s
            out[..., i + half] = t[..., i + half] * c + t[..., i] * s
        return out

    q, k = rot(q), rot(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= i - j < window
    scores = scores.masked_fill(~allowed, float("-inf"))
    y = scores.softmax(-1) @ v
    return attn.proj(y.transpose(1, 2).reshape(B, T, nh * hd))


@pytest.mark.parametrize("window", [None, 5])
def test_attention_matches_naive_reference(window):
    model = make("micro", sliding_window=window)
    attn = model.blocks[0].attn
    T = 12
    x = torch.randn(2, T, model.config.n_embd)
    theta = model.config.rope_theta
    hd = model.config.hd
    freqs = torch.outer(torch.arange(T).float(), theta ** (-torch.arange(0, hd, 2).float() / hd))
    expected = naive_attention(attn, x, freqs.cos(), freqs.sin(), window)
    from lmforge.model.transformer import attention_mask

    mask = attention_mask(T, 0, None, window, x.device)
    assert (mask is None) == (window is None)  # the plain causal case takes the is_causal path
    rope = model.rope_cos[:T].unsqueeze(0), model.rope_sin[:T].unsqueeze(0)
    got = attn(x, rope, mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_doc_positions_restart_at_each_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert doc_positions(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize("style", STYLES)
def test_packed_documents_equal_separate_runs(style):
    model = make(style)
    lengths = [[5, 7, 4], [9, 7]]
    idx = torch.randint(0, 256, (2, 16))
    doc_ids = torch.stack(
        [torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)) for ls in lengths]
    )
    packed = model(idx, doc_ids=doc_ids)
    for row, ls in enumerate(lengths):
        start = 0
        for n in ls:
            alone = model(idx[row : row + 1, start : start + n])
            torch.testing.assert_close(packed[row, start : start + n], alone[0], atol=1e-5, rtol=0)
            start += n
    # without doc_ids the later documents see earlier ones, so the logits must differ
    assert not torch.allclose(model(idx)[0, 5:12], packed[0, 5:12], atol=1e-3)


@pytest.mark.parametrize("style", STYLES)
def test_chunked_prefill_with_kv_cache_matches_full_forward(style):
    model = make(style)
    idx = torch.randint(0, 256, (2, 20))
    full = model(idx)
    cache = KVCache.for_model(model, batch_size=2, max_len=20)
    parts = [model(idx[:, :8], kv_cache=cache), model(idx[:, 8:15], kv_cache=cache, start_pos=8)]
    parts += [model(idx[:, t : t + 1], kv_cache=cache, start_pos=t) for t in range(15, 20)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_pad_positions_start_at_each_rows_first_token():
    pad_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert pad_positions(pad_mask, 0).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0] * 5]
    assert pad_positions(pad_mask, 3).tolist() == [[1, 2], [3, 4], [0, 0]]


def test_attention_mask_hides_padding_and_keeps_the_fast_path_without_it():
    assert attention_mask(6, 0, None, None, torch.device("cpu")) is None  # is_causal path
    assert attention_mask(1, 5, None, None, torch.device("cpu")) is None  # one decoded token
    pad_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    mask = attention_mask(4, 0, None, None, torch.device("cpu"), pad_mask)
    assert mask.shape == (2, 1, 4, 4)
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    assert torch.equal(mask[1, 0], causal)
    expected = causal & pad_mask[0].bool()
    expected[0, 0] = expected[1, 1] = True  # a pad query sees only itself: no all-masked row
    assert torch.equal(mask[0, 0], expected)


@pytest.mark.parametrize(("style", "window"), [("micro", None), ("micro", 5), ("micro-gpt2", None)])
def test_left_padded_batch_equals_each_row_alone(style, window):
    """Prefill, then cached decode steps: every real position matches the row run unpadded."""
    model = make(style, sliding_window=window)
    lengths, T, steps = [12, 4, 9, 1], 12, 5
    seqs = torch.randint(0, 256, (len(lengths), T + steps))
    idx = torch.full((len(lengths), T), 7)  # the pad id should not matter: it is never seen
    pad_mask = torch.zeros(len(lengths), T + steps, dtype=torch.long)
    for i, n in enumerate(lengths):
        idx[i, T - n :] = seqs[i, :n]
        pad_mask[i, T - n :] = 1
    cache = KVCache.for_model(model, batch_size=len(lengths), max_len=T + steps)
    parts = [model(idx, kv_cache=cache, pad_mask=pad_mask[:, :T])]
    for t in range(steps):  # decode: row i's next token is seqs[i, n_i + t]
        nxt = torch.stack([seqs[i, n + t] for i, n in enumerate(lengths)])[:, None]
        parts.append(model(nxt, kv_cache=cache, start_pos=T + t, pad_mask=pad_mask[:, : T + t + 1]))
    padded = torch.cat(parts, dim=1)  # (B, T + steps, V)
    uncached = model(idx, pad_mask=pad_mask[:, :T])  # the prompt alone, no cache
    assert torch.isfinite(padded).all() and torch.isfinite(uncached).all()
    for i, n in enumerate(lengths):
        alone = model(seqs[i : i + 1, : n + steps])[0]  # (n + steps, V)
        torch.testing.assert_close(padded[i, T - n :], alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(uncached[i, T - n :], alone[:n], atol=1e-5, rtol=0)


def test_sliding_window_limits_context():
    model = make("micro", sliding_window=4)
    idx = torch.randint(0, 256, (1, 12))
    other = idx.clone()
    other[0, :4] = (idx[0, :4] + 1) % 256  # change tokens more than 2 windows before the end
    # with 2 layers and window 4 the last token sees at most 2 * 3 = 6 tokens back
    torch.testing.assert_close(model(idx)[0, -1], model(other)[0, -1], atol=1e-5, rtol=0)
    assert not torch.allclose(model(idx)[0, 4], model(other)[0, 4], atol=1e-4)


@pytest.mark.parametrize("style", STYLES)
def test_gradient_checkpointing_gives_same_grads(style):
    model = make(style).train()
    idx = torch.randint(0, 256, (2, 16))
    doc_ids = torch.tensor([[0] * 6 + [1] * 10, [0] * 16])

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        logits = model(idx[:, :-1], doc_ids=doc_ids[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_gpt2_124m_preset_has_124m_params_and_flops():
    with torch.device("meta"):
        model = Transformer(preset_config("gpt2-124m"))
    assert model.num_params() == 124_475_904  # 50304 vocab (tied) + 1024 learned positions
    assert abs(model.num_params() / 124e6 - 1) < 0.01
    n = model.num_params(exclude_embeddings=True)
    assert n == 124_475_904 - 1024 * 768  # nanoGPT's count: position table excluded
    assert model.flops_per_token(1024) == 6 * n + 12 * 12 * 768 * 1024


def test_untied_embeddings_excluded_from_non_embedding_count():
    tied, untied = make("micro"), make("micro", tie_embeddings=False)
    assert tied.lm_head.weight is tied.tok_emb.weight
    table = 256 * 64
    assert untied.num_params() == tied.num_params() + table
    assert untied.num_params(exclude_embeddings=True) == tied.num_params()


def test_init_scales_residual_projections():
    model = make("micro", n_layer=8, n_embd=128, intermediate_size=512)
    std = model.config.init_std
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(std, rel=0.05)
    resid = torch.cat([b.mlp.proj.weight.flatten() for b in model.blocks])
    assert resid.std().item() == pytest.approx(std / math.sqrt(16), rel=0.05)


def test_meta_device_build_then_init_weights():
    with torch.device("meta"):
        model = Transformer(preset_config("micro"))
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_weights()
    logits = model(torch.randint(0, 256, (1, 8)))
    assert torch.isfinite(logits).all()
    assert torch.allclose(model.rope_cos[0], torch.ones(model.config.hd))


def test_hidden_states_feed_the_lm_head():
    model = make("micro")
    idx = torch.randint(0, 256, (2, 9))
    h = model.hidden_states(idx)
    assert h.shape == (2, 9, model.config.n_embd)
    torch.testing.assert_close(model.lm_head(h), model(idx))


def test_too_long_sequence_is_an_input_error():
    model = make("micro", block_size=16)
    with pytest.raises(InputError, match="block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_config_round_trip_and_errors():
    cfg = preset_config("llama-1b", vocab_size=1000)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="micro, micro-gpt2"):
        preset_config("nope")
    with pytest.raises(ConfigError, match="n_kv_head"):
        preset_config("micro", n_kv_head=3)
    with pytest.raises(ConfigError, match=r"model\.norm='batchnorm'"):
        preset_config("micro", norm="batchnorm")
    with pytest.raises(ConfigError, match="unknown model config key"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_layers": 3})
    assert set(PRESETS) >= {"micro", "tiny", "small", "gpt2-124m", "llama-1b"}


@pytest.mark.parametrize("style", STYLES)
def test_bf16_weights_and_autocast_run_close_to_fp32(style):
    from lmforge.model.generate import generate

    model = make(style)
    idx = torch.randint(0, 256, (2, 16))
    doc_ids = torch.tensor([[0] * 7 + [1] * 9, [0] * 16])
    ref = model(idx, doc_ids=doc_ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(idx, doc_ids=doc_ids)
    assert mixed.dtype == torch.bfloat16
    assert (mixed.float() - ref).abs().max().item() < 0.05
    half = make(style).to(torch.bfloat16)
    assert (half(idx, doc_ids=doc_ids).float() - ref).abs().max().item() < 0.05
    assert generate(half, idx[:, :4], 6, greedy=True).shape == (2, 10)


def test_forward_with_labels_returns_the_fp32_next_token_loss():
    from lmforge.model.transformer import IGNORE_INDEX

    torch.manual_seed(0)
    model = Transformer(preset_config("micro", vocab_size=50))
    x = torch.randint(0, 50, (2, 12))
    y = torch.randint(0, 50, (2, 12))
    y[0, :4] = IGNORE_INDEX
    expected = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
    loss = model(x, labels=y)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert torch.allclose(loss, expected, atol=1e-6)
