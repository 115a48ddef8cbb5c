"""Beam search against transformers' generate(num_beams=...): the same tokens, batched, with EOS."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import hashed_dump, validate
from lmforge.errors import ConfigError, InputError
from lmforge.evals.lm import GenerationSettings
from lmforge.finetune.config import EvalOptions
from lmforge.model.beam_search import (
    BeamSettings,
    beam_generate_batched,
    beam_generate_seq2seq_batched,
)
from lmforge.model.config import preset_config
from lmforge.model.convert import load_pretrained, save_pretrained
from lmforge.model.generate import KVCache, generate_batched
from lmforge.model.seq2seq import Seq2SeqLM
from lmforge.model.transformer import Transformer

transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 17, 33, 99], [7, 8, 9, 10, 11, 12, 13], [42], [3, 200, 4]]
SOURCES = [[5, 17, 33, 99, 2], [7, 8, 9, 10, 11, 12, 13, 2], [42, 2]]
BART_IDS = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
# settings where the rules differ: length penalty both ways, each early_stopping mode
BEAMS = [
    dict(num_beams=4, length_penalty=1.0, early_stopping=False),
    dict(num_beams=4, length_penalty=2.0, early_stopping=False),
    dict(num_beams=3, length_penalty=-0.5, early_stopping=True),
    dict(num_beams=4, length_penalty=1.5, early_stopping="never"),
    # a prompt whose num_beams are finished while its batch-mates run on takes no more
    dict(num_beams=3, length_penalty=2.0, early_stopping=True),
]


def beams_id(beams: dict) -> str:
    return f"lp{beams['length_penalty']}-early_{beams['early_stopping']}"


def decoder(preset: str, tmp_path, eos: int | None = None) -> tuple[Transformer, object]:
    """A random decoder with peaked next-token distributions, and transformers' load of it."""
    torch.manual_seed(0)
    model = Transformer(preset_config(preset, init_std=0.3)).eval()
    save_pretrained(model, tmp_path, extra_config={"eos_token_id": eos, "pad_token_id": 0})
    return model, transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()


def hf_beams(hf, prompt: list[int], max_new: int, eos: list[int] | None, **beams) -> list[int]:
    """transformers' best beam for one prompt: its new ids through the first eos."""
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new,
            eos_token_id=eos, pad_token_id=0, **beams,
        )[0, len(prompt) :].tolist()  # fmt: skip
    end = next((i + 1 for i, t in enumerate(out) if t in (eos or [])), len(out))
    return out[:end]


def frequent_token(model: Transformer, max_new: int) -> int:
    """A token the beams emit mid-answer: made the stop token, the beams do finish early."""
    rows = beam_generate_batched(model, PROMPTS, max_new, BeamSettings(num_beams=4))
    return max((t for row in rows for t in row[1:-3]), key=[t for r in rows for t in r].count)


@pytest.mark.parametrize("preset", ["micro", "micro-gpt2"])
@pytest.mark.parametrize("beams", BEAMS, ids=beams_id)
def test_decoder_beams_equal_transformers_in_a_padded_batch(preset, beams, tmp_path):
    model, _ = decoder(preset, tmp_path / "probe")
    stop = frequent_token(model, 14)
    model, hf = decoder(preset, tmp_path / "model", eos=stop)
    ours = beam_generate_batched(
        model, PROMPTS, 14, BeamSettings(**beams), batch_size=4, stop_tokens=[stop]
    )
    for prompt, got in zip(PROMPTS, ours, strict=True):
        assert got == hf_beams(hf, prompt, 14, [stop], **beams)
    if beams["length_penalty"] <= 1.0:  # longer answers are not favoured: some beams stop
        assert any(row[-1] == stop and len(row) < 14 for row in ours), "no beam stopped early"


def test_several_stop_tokens_and_repetition_penalty_match_transformers(tmp_path):
    model, _ = decoder("micro", tmp_path / "probe")
    first = frequent_token(model, 12)
    model, hf = decoder("micro", tmp_path / "model", eos=first)
    stops = [first, 77]
    beams = dict(num_beams=4, length_penalty=1.0, early_stopping=False)
    ours = beam_generate_batched(
        model, PROMPTS, 12, BeamSettings(**beams, repetition_penalty=1.3), stop_tokens=stops
    )
    for prompt, got in zip(PROMPTS, ours, strict=True):
        assert got == hf_beams(hf, prompt, 12, stops, repetition_penalty=1.3, **beams)


def test_left_padding_is_not_a_seen_token_for_the_repetition_penalty(tmp_path):
    model, _ = decoder("micro", tmp_path)
    beams = BeamSettings(num_beams=4, repetition_penalty=1.3)
    rows = beam_generate_batched(model, PROMPTS, 10, beams, batch_size=1)
    short = [len(p) < max(map(len, PROMPTS)) for p in PROMPTS]  # left-padded in a batch of all
    padded = [row for row, pad in zip(rows, short, strict=True) if pad]
    often = max({t for r in padded for t in r}, key=lambda t: sum(r.count(t) for r in padded))
    with torch.no_grad():  # swap ids 0 and `often` (tied embeddings): left_pad's pad id is likely
        model.tok_emb.weight[[0, often]] = model.tok_emb.weight[[often, 0]]
    alone = beam_generate_batched(model, PROMPTS, 10, beams, batch_size=1)
    assert any(0 in row for row, pad in zip(alone, short, strict=True) if pad)
    assert beam_generate_batched(model, PROMPTS, 10, beams, batch_size=4) == alone


def test_kv_cache_reorder_moves_written_positions_with_their_rows():
    cache = KVCache(n_layer=2, batch_size=2, n_kv_head=1, max_len=6, head_dim=3)
    k = torch.randn(2, 1, 4, 3)
    for layer in range(2):
        cache.update(layer, 0, k, -k)
    cache.reorder_cache(torch.tensor([1, 1, 0]))  # grows the batch: prompts to beams
    cache.reorder_cache(torch.tensor([2, 0, 0]))  # a step's parents: rows k[[0, 1, 1]]
    cache.reorder_cache(torch.tensor([1, 2, 0]))  # the next step's, back into the first buffer
    keys, values = cache.update(1, 4, torch.ones(3, 1, 1, 3), torch.ones(3, 1, 1, 3))
    torch.testing.assert_close(keys[:, :, :4], k[[1, 1, 0]], atol=0, rtol=0)
    torch.testing.assert_close(values[:, :, :4], -k[[1, 1, 0]], atol=0, rtol=0)
    assert keys.shape == (3, 1, 5, 3) and bool((keys[:, :, 4] == 1).all())


def test_one_beam_is_greedy_and_batching_does_not_change_beams(tmp_path):
    model, _ = decoder("micro", tmp_path)
    greedy = generate_batched(model, PROMPTS, 10, greedy=True, stop_tokens=[9])
    assert beam_generate_batched(model, PROMPTS, 10, BeamSettings(1), stop_tokens=[9]) == greedy
    beams = BeamSettings(num_beams=4)
    alone = beam_generate_batched(model, PROMPTS, 10, beams, batch_size=1, stop_tokens=[9])
    assert beam_generate_batched(model, PROMPTS, 10, beams, batch_size=4, stop_tokens=[9]) == alone
    assert alone != greedy  # beams find other (more likely) continuations on this model


def bart(tmp_path) -> tuple[Seq2SeqLM, object]:
    torch.manual_seed(0)
    model = Seq2SeqLM(preset_config("bart-micro", init_std=0.15)).eval()
    with torch.no_grad():
        model.final_logits_bias.normal_()
        model.final_logits_bias[0, 2] += 3.0  # eos likely: beams finish at varied lengths
    save_pretrained(model, tmp_path, extra_config=BART_IDS)
    return model, transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()


@pytest.mark.parametrize("beams", BEAMS, ids=beams_id)
def test_seq2seq_beams_equal_transformers_bart(beams, tmp_path):
    model, hf = bart(tmp_path)
    ours = beam_generate_seq2seq_batched(
        model, SOURCES, 12, BeamSettings(**beams), decoder_start_id=2, pad_id=1, stop_tokens=[2]
    )
    for source, got in zip(SOURCES, ours, strict=True):
        with torch.no_grad():
            out = hf.generate(torch.tensor([source]), do_sample=False, max_new_tokens=12, **beams)
        theirs = out[0, 1:].tolist()
        end = theirs.index(2) + 1 if 2 in theirs else len(theirs)
        assert got == theirs[:end]
    assert any(row[-1:] == [2] for row in ours)


def test_t5_adapter_beams_equal_transformers(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=200, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    hf = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(4.0)  # peaked, varied tokens from a random model
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    sources = [[5, 6, 7, 8, 1], [9, 10, 11, 1], [12, 1]]
    stops = [1, 173]  # 173: a token the first source's beams reach after a few others
    beams = dict(num_beams=4, length_penalty=1.0, early_stopping=False)
    new = beam_generate_seq2seq_batched(
        ours, sources, 10, BeamSettings(**beams), decoder_start_id=0, pad_id=0, stop_tokens=stops
    )
    for source, got in zip(sources, new, strict=True):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([source]), do_sample=False, max_new_tokens=10, eos_token_id=stops,
                **beams,
            )[0, 1:].tolist()  # fmt: skip
        end = next((i + 1 for i, t in enumerate(out) if t in stops), len(out))
        assert got == out[:end]
    assert any(len(row) < 10 for row in new)


def test_bad_beam_settings_and_lengths_are_refused():
    model = Transformer(preset_config("micro"))
    with pytest.raises(InputError, match=r"prompt \(4 tokens\) \+ max_new_tokens \(125\) exceeds"):
        beam_generate_batched(model, [[1, 2, 3, 4]], 125, BeamSettings(2))
    with pytest.raises(ConfigError, match="num_beams must be >= 1"):
        BeamSettings(num_beams=0)
    with pytest.raises(ConfigError, match="early_stopping must be"):
        BeamSettings(num_beams=2, early_stopping="sometimes")


def test_beam_settings_leave_existing_config_hashes_alone():
    assert "num_beams" not in hashed_dump(GenerationSettings())
    assert "length_penalty" not in hashed_dump(GenerationSettings(num_beams=2))
    assert hashed_dump(GenerationSettings(num_beams=2))["num_beams"] == 2
    assert "num_beams" not in hashed_dump(EvalOptions())
    assert hashed_dump(EvalOptions(num_beams=4))["num_beams"] == 4
    with pytest.raises(ConfigError, match=r"num_beams=4 with temperature 0\.5"):
        validate(GenerationSettings, {"num_beams": 4, "temperature": 0.5})
