"""Imported checkpoints generate as transformers does: their generation_config's defaults
(beams, length penalty, no-repeat n-grams, minimum lengths, forced bos/eos) are read and applied,
each logits rule equals transformers' processor, and settings given explicitly win."""

from __future__ import annotations

import json
import logging
from itertools import pairwise

import pytest
import torch

from lmforge.config import hashed_dump, validate
from lmforge.evals.lm import EvalModel, GenerationSettings
from lmforge.model.generation_defaults import read_generation_defaults
from lmforge.model.logits_rules import LogitsRules

from ..evals.family_dirs import _copy_files
from ..finetune.helpers import make_tokenizer_dir

transformers = pytest.importorskip("transformers")

NEG = float("-inf")
PROMPTS = ["What is the capital of France?", "Return the absolute value", "os.path.join"]
# bart-large-cnn's kind of defaults, scaled to a tiny model (our tokenizer: pad 0, eos 2)
BART_GEN = dict(
    num_beams=4, length_penalty=2.0, early_stopping=True, no_repeat_ngram_size=3, min_length=6,
    max_length=14, forced_bos_token_id=1, forced_eos_token_id=2, bos_token_id=1,
    eos_token_id=2, pad_token_id=0, decoder_start_token_id=2,
)  # fmt: skip
LLAMA_GEN = dict(
    num_beams=3, no_repeat_ngram_size=2, min_new_tokens=5, max_new_tokens=12,
    bos_token_id=1, eos_token_id=[2, 7], pad_token_id=0,
)  # fmt: skip


def peaked(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    """Random weights scaled up: peaked, repetitive next-token choices the rules must change."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(std=scale)
    return model.eval()


def save_hf(hf, gen: dict, tmp_path, tok, in_config_json: bool) -> None:
    """hf saved with gen as generation_config.json, or (older checkpoints) inside config.json."""
    hf.generation_config = transformers.GenerationConfig(**gen)
    hf.save_pretrained(tmp_path)
    if in_config_json:
        (tmp_path / "generation_config.json").unlink()
        config = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**config, **gen}))
    _copy_files(tok, tmp_path)


def hf_new_ids(hf, ids: list[int], skip: int, stops: list[int], **explicit) -> list[int]:
    """transformers' generate() with the checkpoint's defaults: new ids through the first stop."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), **explicit)[0, skip:].tolist()
    end = next((i + 1 for i, t in enumerate(out) if t in stops), len(out))
    return out[:end]


def ours(lm: EvalModel, settings: GenerationSettings) -> list[list[int]]:
    return lm.scorer.generate(PROMPTS, lm.settings_for(settings), False, 2)


@pytest.fixture
def tok(tmp_path):
    return make_tokenizer_dir(tmp_path / "tok")


def bart_dir(tmp_path, tok, in_config_json: bool):
    cfg = transformers.BartConfig(
        vocab_size=300, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=2,
    )  # fmt: skip
    hf = peaked(transformers.BartForConditionalGeneration(cfg), 0.3)
    save_hf(hf, BART_GEN, tmp_path / "bart", tok, in_config_json)
    return tmp_path / "bart", transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "bart")


@pytest.mark.parametrize("in_config_json", [False, True], ids=["generation_config", "config"])
def test_bart_generates_with_its_checkpoint_defaults_as_transformers(tmp_path, tok, in_config_json):
    path, hf = bart_dir(tmp_path, tok, in_config_json)
    lm = EvalModel.load(path)
    assert lm.generation_defaults["num_beams"] == 4
    assert lm.generation_defaults["max_new_tokens"] == 13  # max_length 14, decoder start included
    got = ours(lm, GenerationSettings())
    for prompt, row in zip(PROMPTS, got, strict=True):
        assert row == hf_new_ids(hf.eval(), lm.scorer.source(prompt), 1, [2])
        assert row[0] == 1 and len(row) >= 5  # forced bos; min_length 6 counts the start
    plain = dict(num_beams=1, no_repeat_ngram_size=0, min_length=0)
    for explicit in ({"num_beams": 1}, plain):  # greedy under the rules; explicit settings win
        rows = ours(lm, GenerationSettings(**explicit))
        assert rows != got  # the settings changed what the model says
        for prompt, row in zip(PROMPTS, rows, strict=True):
            assert row == hf_new_ids(hf, lm.scorer.source(prompt), 1, [2], **explicit)


def test_min_new_tokens_given_replaces_the_checkpoint_min_length_as_transformers(tmp_path, tok):
    path, hf = bart_dir(tmp_path, tok, in_config_json=False)
    lm = EvalModel.load(path)
    hf.eval()
    for explicit in ({"min_new_tokens": 0}, {"min_new_tokens": 2}):
        resolved = lm.settings_for(GenerationSettings(**explicit))
        assert resolved.min_length == 0  # transformers: min_length = min_new_tokens + 1
        for prompt, row in zip(PROMPTS, ours(lm, GenerationSettings(**explicit)), strict=True):
            assert row == hf_new_ids(hf, lm.scorer.source(prompt), 1, [2], **explicit)
    checkpoint = {**lm.generation_defaults, "min_new_tokens": 3}
    lm.generation_defaults = checkpoint  # a checkpoint setting both: min_new_tokens wins
    assert lm.settings_for(GenerationSettings()).min_length == 0
    assert lm.settings_for(GenerationSettings(min_length=4)).min_new_tokens == 0  # given wins


def peaked_llama():
    """A tiny random transformers Llama with peaked next-token choices."""
    cfg = transformers.LlamaConfig(
        vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )  # fmt: skip
    return peaked(transformers.LlamaForCausalLM(cfg), 0.2)


def llama_dir(tmp_path, tok):
    hf = peaked_llama()
    save_hf(hf, LLAMA_GEN, tmp_path / "llama", tok, in_config_json=False)
    return tmp_path / "llama", transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "llama")


def test_llama_beams_and_greedy_follow_the_checkpoint_as_transformers(tmp_path, tok):
    path, hf = llama_dir(tmp_path, tok)
    lm = EvalModel.load(path)
    hf.eval()
    for explicit in ({}, {"num_beams": 1}):  # the checkpoint's beams, then greedy by request
        got = ours(lm, GenerationSettings(**explicit))
        for prompt, row in zip(PROMPTS, got, strict=True):
            ids = lm.start(prompt)
            assert row == hf_new_ids(hf, ids, len(ids), [2, 7], **explicit)
            assert not set(row[:5]) & {2, 7}  # min_new_tokens 5
            pairs = list(pairwise(ids + row))
            assert len(pairs) == len(set(pairs))  # no_repeat_ngram_size 2, prompt included
    assert len(ours(lm, GenerationSettings(max_new_tokens=3))[0]) == 3
    for row in ours(lm, GenerationSettings(temperature=1.0, seed=3)):  # sampling obeys them too
        assert not set(row[:5]) & {2, 7}
        pairs = list(pairwise(row))
        assert len(pairs) == len(set(pairs))


def test_explicit_settings_win_even_at_their_default_value(tmp_path, tok):
    path, _ = llama_dir(tmp_path, tok)
    lm = EvalModel.load(path)
    resolved = lm.settings_for(GenerationSettings())
    assert (resolved.num_beams, resolved.no_repeat_ngram_size, resolved.max_new_tokens) == (
        3,
        2,
        12,
    )
    given = validate(GenerationSettings, {"num_beams": 1, "min_new_tokens": 0})
    resolved = lm.settings_for(given)
    assert (resolved.num_beams, resolved.min_new_tokens, resolved.no_repeat_ngram_size) == (1, 0, 2)
    assert lm.settings_for(GenerationSettings(temperature=0.7)).num_beams == 1  # sampling asked


def test_our_exports_carry_no_defaults_and_hashes_stay(tmp_path):
    from lmforge.model.config import preset_config
    from lmforge.model.convert import save_pretrained
    from lmforge.model.seq2seq import Seq2SeqLM

    save_pretrained(Seq2SeqLM(preset_config("bart-micro")), tmp_path)
    assert read_generation_defaults(tmp_path, is_encoder_decoder=True) == {}
    new = ("no_repeat_ngram_size", "min_length", "min_new_tokens", "forced_bos_token_id")
    assert not set(new) & hashed_dump(GenerationSettings()).keys()


# -- each rule alone against transformers' processor, on random logits ----------------------------


def random_case(seed: int = 0, T: int = 12, V: int = 9):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (3, T), generator=g), torch.randn(3, V, generator=g)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_equals_transformers(n):
    ids, logits = random_case()
    want = transformers.NoRepeatNGramLogitsProcessor(n)(ids, logits.clone())
    got = LogitsRules(no_repeat_ngram_size=n).apply(logits.clone(), ids, None, 0, 5, [2])
    assert torch.equal(got, want) and bool(torch.isinf(got).any())
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: row 0 is its last 8 tokens alone
    padded = LogitsRules(no_repeat_ngram_size=n).apply(logits.clone(), ids, mask, 0, 5, [2])
    alone = transformers.NoRepeatNGramLogitsProcessor(n)(ids[:1, 4:], logits[:1].clone())
    assert torch.equal(padded[:1], alone)


@pytest.mark.parametrize("min_length", [12, 13, 20])
def test_min_length_equals_transformers(min_length):
    ids, logits = random_case()
    want = transformers.MinLengthLogitsProcessor(min_length, [2, 5])(ids, logits.clone())
    got = LogitsRules(min_length=min_length).apply(logits, ids, None, 4, 9, [2, 5])
    assert torch.equal(got, want)


@pytest.mark.parametrize("step", [3, 4, 6])
def test_min_new_tokens_equals_transformers(step):
    ids, logits = random_case()
    processor = transformers.MinNewTokensLengthLogitsProcessor(12 - step, 5, [2])
    got = LogitsRules(min_new_tokens=5).apply(logits, ids, None, step, 9, [2])
    assert torch.equal(got, processor(ids, logits.clone()))


@pytest.mark.parametrize("T", [1, 2])
def test_forced_bos_and_eos_equal_transformers(T):
    ids, logits = random_case(T=T)
    bos = transformers.ForcedBOSTokenLogitsProcessor(3)(ids, logits.clone())
    assert torch.equal(LogitsRules(forced_bos_token_id=3).apply(logits, ids, None, 0, 4, []), bos)
    eos = transformers.ForcedEOSTokenLogitsProcessor(T + 1, [2, 4])(ids, logits.clone())
    rules = LogitsRules(forced_eos_token_id=(2, 4))
    assert torch.equal(rules.apply(logits, ids, None, 0, 1, []), eos)  # the last step
    assert torch.equal(rules.apply(logits, ids, None, 0, 2, []), logits)  # not the last


@pytest.mark.parametrize("in_config_json", [False, True], ids=["generation_config", "config"])
def test_a_model_tuned_from_the_checkpoint_exports_its_defaults(tmp_path, tok, in_config_json):
    from types import SimpleNamespace

    from lmforge.common.io import atomic_path
    from lmforge.finetune.export import export_model
    from lmforge.model.convert import load_pretrained
    from lmforge.tokenizer.files import TokenizerFiles

    path, _ = bart_dir(tmp_path, tok, in_config_json)
    ctx = SimpleNamespace(out=tmp_path / "tuned", atomic_path=atomic_path)
    ids = {k: BART_GEN[k] for k in ("pad_token_id", "eos_token_id", "decoder_start_token_id")}
    export_model(ctx, path, load_pretrained(path), TokenizerFiles.load(path), seq2seq_ids=ids)
    final = tmp_path / "tuned" / "final"
    written = json.loads((final / "generation_config.json").read_text())
    assert {k: written[k] for k in ("num_beams", "max_length", "forced_bos_token_id")} == {
        "num_beams": 4, "max_length": 14, "forced_bos_token_id": 1,
    }  # fmt: skip
    lm, hf = EvalModel.load(final), transformers.AutoModelForSeq2SeqLM.from_pretrained(final)
    for prompt, row in zip(PROMPTS, ours(lm, GenerationSettings()), strict=True):
        assert row == hf_new_ids(hf.eval(), lm.scorer.source(prompt), 1, [2])


def test_generate_cli_uses_the_checkpoint_defaults_unless_an_option_is_given(tmp_path, tok):
    from typer.testing import CliRunner

    from lmforge.cli import app

    path, _ = llama_dir(tmp_path, tok)
    lm = EvalModel.load(path)
    answers = {}
    for name, options in (("defaults", []), ("greedy", ["--num-beams", "1"])):
        out = tmp_path / f"{name}.jsonl"
        args = ["generate", "--model", str(path), "--out", str(out)]
        result = CliRunner().invoke(
            app, [*args, *(a for p in PROMPTS for a in ("-p", p)), *options]
        )
        assert result.exit_code == 0, result.output
        answers[name] = [json.loads(line)["completion"] for line in out.read_text().splitlines()]
    assert answers["defaults"] == lm.generate_batch(PROMPTS, GenerationSettings())
    assert answers["greedy"] == lm.generate_batch(PROMPTS, GenerationSettings(num_beams=1))
    assert answers["greedy"] != answers["defaults"]


def test_a_hypothesis_a_rule_forbade_never_fills_a_finished_slot():
    from lmforge.model.beam_search import Finished

    done = Finished(1, 2, 3, torch.device("cpu"))
    tokens = torch.zeros((1, 4, 3), dtype=torch.long)
    done.add(tokens, torch.tensor([[NEG, NEG, NEG, NEG]]), torch.ones((1, 4), dtype=torch.bool), 1)
    assert not bool(done.filled.any())
    done.add(
        tokens, torch.tensor([[-1.0, NEG, -2.0, NEG]]), torch.ones((1, 4), dtype=torch.bool), 2
    )
    assert bool(done.full().all()) and done.scores.tolist() == [[-1.0, -2.0]]


def test_a_finished_hypothesis_never_runs_on_when_rules_leave_few_candidates():
    from lmforge.model.beam_search import BeamSettings, beam_search

    logits = torch.tensor([[0.6, 0.1, 0.3]]).log().repeat(4, 1)  # eos 0 likely, bos 1, word 2
    rules = LogitsRules(forced_bos_token_id=1)  # step one: a single token is possible
    beams = BeamSettings(4, length_penalty=5.0, early_stopping=True, rules=rules)
    best = beam_search(lambda *_: logits, logits, torch.tensor([[2]] * 4), 4, beams, [0])[0]
    assert best[0] == 1 and 0 not in best[:-1]


def test_the_eval_cache_key_holds_the_checkpoint_defaults_left_unset(tmp_path, tok):
    from lmforge.artifacts import input_hashes
    from lmforge.evals.stage import EvalConfig
    from lmforge.model.config import preset_config
    from lmforge.model.convert import save_pretrained
    from lmforge.model.seq2seq import Seq2SeqLM

    path, _ = bart_dir(tmp_path, tok, in_config_json=False)
    task = {"name": "g", "type": "generation", "examples": [{"prompt": "a", "reference": "b"}]}

    def versions(generation: dict, tasks=(task,), model=path) -> dict:
        cfg = validate(EvalConfig, {"models": [model], "tasks": list(tasks), "out": tmp_path / "e",
                                    "generation": generation})  # fmt: skip
        return cfg.input_versions()

    unset = versions({})
    assert json.loads(next(iter(unset.values())))["num_beams"] == 4
    explicit = versions({"num_beams": 1})  # hashes as {}: the key must differ
    assert explicit != unset and "num_beams" not in json.loads(next(iter(explicit.values())))
    every = {k: 0 for k in ("no_repeat_ngram_size", "min_length", "min_new_tokens")}
    every |= {"num_beams": 1, "length_penalty": 1.0, "early_stopping": False,
              "max_new_tokens": 8, "forced_bos_token_id": None, "forced_eos_token_id": None}  # fmt: skip
    assert versions(every) == {}  # all given: as before this change
    per_task = {**task, "generation": every}
    assert versions({}, tasks=(per_task,)) == {}  # the task's own settings are what apply
    no_gen = {"name": "p", "type": "perplexity", "examples": [{"text": "a b"}]}
    assert versions({}, tasks=(no_gen,)) == {}  # nothing generated, nothing to key
    save_pretrained(Seq2SeqLM(preset_config("bart-micro")), tmp_path / "ours")
    _copy_files(tok, tmp_path / "ours")
    ours_cfg = {"models": [tmp_path / "ours"], "tasks": [task], "out": tmp_path / "e"}
    assert validate(EvalConfig, ours_cfg).input_versions() == {}  # our models' keys stay
    assert len(input_hashes(validate(EvalConfig, ours_cfg))) == 1  # the model dir alone


def test_compiled_decoding_applies_the_rules_as_eager_decoding(monkeypatch):
    from torch._dynamo.utils import counters

    from lmforge.model import compiled_decode
    from lmforge.model.config import preset_config
    from lmforge.model.generate import generate, left_pad
    from lmforge.model.transformer import Transformer

    monkeypatch.setattr(compiled_decode, "BACKEND", "aot_eager")  # seconds, not the inductor's
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = Transformer(preset_config("micro", vocab_size=32, n_layer=2, init_std=0.2)).eval()
    ids, mask = left_pad([[1, 5, 9, 2, 7, 4], [3, 3, 8], [30, 2, 2, 11, 6]])
    rules = LogitsRules(no_repeat_ngram_size=2, min_new_tokens=4, forced_eos_token_id=2)
    kw = dict(pad_mask=mask, greedy=True, stop_tokens=[2], rules=rules)
    try:
        want = generate(model, ids, 12, **kw)
        assert torch.equal(generate(model, ids, 12, compile="on", **kw), want)
        assert want[:, -1].tolist() == [2, 2, 2]  # forced eos at the last step, or stopped
        assert counters["frames"]["ok"] == 1  # the rules run outside the compiled step
    finally:
        torch._dynamo.reset()
    assert not torch.equal(want, generate(model, ids, 12, pad_mask=mask, greedy=True))


def test_forced_ids_outside_the_vocabulary_are_refused_with_the_key_named():
    from lmforge.errors import ConfigError

    with pytest.raises(ConfigError, match="forced_bos_token_id / forced_eos_token_id"):
        LogitsRules(forced_eos_token_id=(2, -1))
    with pytest.raises(ConfigError, match="forced_eos_token_id"):  # named where it was given
        validate(GenerationSettings, {"forced_eos_token_id": [2, -1]}, where="eval.generation")
    ids, logits = random_case()  # a vocabulary of 9
    with pytest.raises(ConfigError, match=r"forced token id 9 is outside .* vocabulary of 9"):
        LogitsRules(forced_bos_token_id=9).apply(logits, ids[:, :1], None, 0, 4, [2])


def test_beams_cut_at_max_length_end_with_the_forced_eos_as_transformers(tmp_path, tok):
    path, hf = bart_dir(tmp_path, tok, in_config_json=False)
    lm = EvalModel.load(path)
    hf.eval()
    for explicit in ({"max_new_tokens": 4, "min_length": 0}, {"max_new_tokens": 5}):
        rows = ours(lm, GenerationSettings(**explicit))
        for prompt, row in zip(PROMPTS, rows, strict=True):
            assert row == hf_new_ids(hf, lm.scorer.source(prompt), 1, [2], **explicit)
            assert row[-1] == 2 and len(row) <= explicit["max_new_tokens"]
        assert max(map(len, rows)) == explicit["max_new_tokens"]  # one reached the limit


def test_a_checkpoint_setting_keys_lmforge_does_not_apply_gets_a_warning(tmp_path, caplog):
    from lmforge.model.generation_defaults import warn_not_applied

    gen = {"num_beams": 4, "suppress_tokens": [5], "num_beam_groups": 1, "bad_words_ids": [],
           "diversity_penalty": 0.5}  # fmt: skip
    (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    logger = logging.getLogger("lmforge.model.generation_defaults")
    logger.addHandler(caplog.handler)  # whether or not a CLI test stopped lmforge's propagation
    try:
        assert warn_not_applied(tmp_path) == ["suppress_tokens", "diversity_penalty"]
    finally:
        logger.removeHandler(caplog.handler)
    assert "suppress_tokens, diversity_penalty" in caplog.text
    assert "generation_config.json" in caplog.text
    (tmp_path / "generation_config.json").write_text(json.dumps({"num_beams": 4}))
    assert warn_not_applied(tmp_path) == []
