"""Seq2SeqLM against transformers: BART both ways, T5 through the adapter, cached generation."""

import json

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.model.config import preset_config
from lmforge.model.convert import load_pretrained, model_class, save_pretrained
from lmforge.model.seq2seq import Seq2SeqLM
from lmforge.model.seq2seq_generate import generate_seq2seq, generate_seq2seq_batched, right_pad
from lmforge.model.t5 import wraps_transformers
from lmforge.model.transformer import Transformer

transformers = pytest.importorskip("transformers")

IDS = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)


def _batch(vocab: int):
    torch.manual_seed(3)
    src = torch.randint(3, vocab, (2, 9))
    mask = torch.ones_like(src)
    mask[1, 6:] = 0  # right padding in the second source
    return src, mask, torch.randint(3, vocab, (2, 7))


def _ours(tmp_path, init_std: float = 0.02):
    torch.manual_seed(0)
    model = Seq2SeqLM(preset_config("bart-micro", init_std=init_std)).eval()
    with torch.no_grad():
        model.final_logits_bias.normal_()  # trained BARTs have one; scratch models start at 0
    save_pretrained(model, tmp_path / "ours", extra_config=IDS)
    return model, tmp_path / "ours"


def test_export_loads_as_bart_with_equal_logits(tmp_path):
    model, path = _ours(tmp_path)
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(path).eval()
    assert type(hf).__name__ == "BartForConditionalGeneration"
    src, mask, tgt = _batch(256)
    with torch.no_grad():
        ours = model(src, tgt, mask)
        theirs = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
    assert ours.shape == (2, 7, 256)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    back = load_pretrained(path)
    with torch.no_grad():
        torch.testing.assert_close(back(src, tgt, mask), ours, atol=0, rtol=0)


def test_padding_hides_source_tokens(tmp_path):
    model, _ = _ours(tmp_path)
    src, mask, tgt = _batch(256)
    with torch.no_grad():
        padded = model(src[1:], tgt[1:], mask[1:])
        alone = model(src[1:, :6], tgt[1:])
        changed = model(src[1:].clone().fill_(7), tgt[1:], mask[1:])
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)
    assert (changed - padded).abs().max() > 1e-3  # the source does reach the decoder


def test_hf_bart_checkpoint_imports_with_equal_logits(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BartConfig(
        vocab_size=300, d_model=32, encoder_layers=2, decoder_layers=3,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=64,
    )  # fmt: skip
    hf = transformers.BartForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        hf.final_logits_bias.normal_()
    hf.save_pretrained(tmp_path / "bart")
    ours = load_pretrained(tmp_path / "bart")
    assert isinstance(ours, Seq2SeqLM) and ours.config.n_dec_layer == 3
    src, mask, tgt = _batch(300)
    with torch.no_grad():
        theirs = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        torch.testing.assert_close(ours(src, tgt, mask), theirs, atol=1e-4, rtol=0)


def test_unequal_encoder_decoder_widths_are_refused(tmp_path):
    cfg = transformers.BartConfig(
        vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=64,
        decoder_ffn_dim=32, encoder_attention_heads=4, decoder_attention_heads=4,
    )  # fmt: skip
    transformers.BartForConditionalGeneration(cfg).save_pretrained(tmp_path / "bart")
    with pytest.raises(Exception, match="encoder_ffn_dim=64 != decoder_ffn_dim=32"):
        load_pretrained(tmp_path / "bart")


def test_greedy_generation_equals_transformers(tmp_path):
    model, path = _ours(tmp_path, init_std=1.0)  # large weights: varied greedy tokens
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(path).eval()
    sources = [[5, 17, 33, 99, 2], [7, 8, 9, 10, 11, 12, 13, 2]]
    opts = dict(decoder_start_id=2, pad_id=1, stop_tokens=[2], greedy=True)
    ours = generate_seq2seq_batched(model, sources, 16, repetition_penalty=1.3, **opts)
    for source, new in zip(sources, ours, strict=True):
        theirs = hf.generate(
            torch.tensor([source]), do_sample=False, max_new_tokens=16, repetition_penalty=1.3
        )
        assert new == theirs[0, 1:].tolist()
        assert len(set(new)) > 3


def test_cached_decoding_equals_full_recompute(tmp_path):
    model, _ = _ours(tmp_path, init_std=1.0)
    src, mask = right_pad([[5, 6, 7, 2], [9, 10, 2]], pad_id=1)
    out = generate_seq2seq(model, src, mask, 10, decoder_start_id=2, greedy=True)
    with torch.no_grad():
        full = model(src, out[:, :-1], mask).argmax(-1)  # every step from scratch, no cache
    assert torch.equal(full, out[:, 1:])


def test_seeded_sampling_does_not_depend_on_batch_size(tmp_path):
    model, _ = _ours(tmp_path, init_std=1.0)
    sources = [[5, 6, 7, 2], [9, 10, 2], [11, 2], [12, 13, 14, 15, 2]]
    opts = dict(decoder_start_id=2, pad_id=1, seed=7, temperature=0.9, top_k=50, top_p=0.95)
    one = generate_seq2seq_batched(model, sources, 8, batch_size=1, **opts)
    four = generate_seq2seq_batched(model, sources, 8, batch_size=4, **opts)
    assert one == four
    assert one != generate_seq2seq_batched(model, sources, 8, batch_size=4, **{**opts, "seed": 8})


def test_a_passed_generator_is_used_and_seed_with_generator_is_refused(tmp_path):
    model, _ = _ours(tmp_path, init_std=1.0)
    sources = [[5, 6, 7, 2], [9, 10, 2], [11, 2], [12, 13, 14, 15, 2]]
    opts = dict(decoder_start_id=2, pad_id=1, temperature=0.9)

    def with_generator(seed):
        return generate_seq2seq_batched(
            model, sources, 8, generator=torch.Generator().manual_seed(seed), **opts
        )

    assert with_generator(3) == with_generator(3) != with_generator(4)
    with pytest.raises(ConfigError, match="either seed"):
        generate_seq2seq_batched(model, sources, 8, seed=7, generator=torch.Generator(), **opts)


def test_t5_checkpoint_loads_generates_and_exports_through_the_adapter(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=200, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False,
    )  # fmt: skip
    hf = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(8.0)  # varied greedy tokens from a random model
    hf.save_pretrained(tmp_path / "t5")
    ours = load_pretrained(tmp_path / "t5")
    src, mask, tgt = _batch(200)
    with torch.no_grad():
        theirs = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        torch.testing.assert_close(ours(src, tgt, mask), theirs, atol=1e-4, rtol=0)
    sources = [[5, 6, 7, 8, 1], [9, 10, 11, 1]]
    new = generate_seq2seq_batched(
        ours, sources, 10, decoder_start_id=0, pad_id=0, stop_tokens=[1], greedy=True
    )
    for source, ids in zip(sources, new, strict=True):
        expect = hf.generate(torch.tensor([source]), do_sample=False, max_new_tokens=10)
        assert ids == [t for t in expect[0, 1:].tolist() if t != 0]
    assert ours.config.is_encoder_decoder and wraps_transformers(ours)
    save_pretrained(ours, tmp_path / "t5-out", extra_config={"eos_token_id": 1})
    again = load_pretrained(tmp_path / "t5-out")
    with torch.no_grad():
        torch.testing.assert_close(again(src, tgt, mask), ours(src, tgt, mask), atol=0, rtol=0)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = Seq2SeqLM(preset_config("bart-micro")).train()
    src, mask, tgt = _batch(256)
    grads = []
    for recompute in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = recompute
        model(src, tgt, mask, labels=tgt).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(plain, recomputed, atol=1e-6, rtol=0)


def test_a_non_bart_seq2seq_round_trips_in_lmforge_layout(tmp_path):
    torch.manual_seed(0)
    cfg = preset_config("bart-micro", norm="rmsnorm", post_norm=False, mlp="swiglu", bias=False)
    model = Seq2SeqLM(cfg).eval()
    save_pretrained(model, tmp_path / "native")
    config = json.loads((tmp_path / "native" / "config.json").read_text())
    assert config["model_type"] == "lmforge"
    src, mask, tgt = _batch(256)
    with torch.no_grad():
        torch.testing.assert_close(
            load_pretrained(tmp_path / "native")(src, tgt, mask), model(src, tgt, mask)
        )


def test_encoder_decoder_configs_are_checked():
    with pytest.raises(ConfigError, match="needs causal=false, pos='learned'"):
        preset_config("bart-micro", pos="rope", pos_offset=0)
    with pytest.raises(ConfigError, match="needs causal=false"):
        preset_config("micro", n_dec_layer=2)


def test_is_encoder_decoder_names_the_configs_that_build_seq2seq_models():
    bart = preset_config("bart-micro")
    assert bart.is_encoder_decoder and model_class(bart) is Seq2SeqLM
    assert not wraps_transformers(Seq2SeqLM(bart))  # ours: freezing and LoRA use our names
    for decoder_or_encoder in ("micro", "bert-micro"):
        cfg = preset_config(decoder_or_encoder)
        assert not cfg.is_encoder_decoder and model_class(cfg) is Transformer
