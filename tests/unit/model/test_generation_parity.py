"""Generation settings resolved as transformers' generate() resolves them: minimum and maximum
lengths' precedence, a checkpoint's sampling keys, beam-only options refused without beams, and
the vectorized n-gram ban; each compared with transformers on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.evals.lm import EvalModel, GenerationSettings
from lmforge.model.logits_rules import LogitsRules

from .test_generation_defaults import PROMPTS, hf_new_ids, peaked_llama, random_case, save_hf

transformers = pytest.importorskip("transformers")


@pytest.fixture
def tok(tmp_path):
    from ..finetune.helpers import make_tokenizer_dir

    return make_tokenizer_dir(tmp_path / "tok")


def tiny_llama(tmp_path, tok, gen: dict, eos_at_step: int | None = None):
    """A peaked tiny Llama saved with gen as its generation_config; with eos_at_step, its eos is
    the token greedy decoding of PROMPTS[0] emits at that step (so length rules matter)."""
    hf = peaked_llama()
    path = tmp_path / "llama"
    if eos_at_step is not None:
        save_hf(hf, {"bos_token_id": 1, "pad_token_id": 0}, path, tok, in_config_json=False)
        ids = EvalModel.load(path).start(PROMPTS[0])
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=eos_at_step + 1, do_sample=False)
        gen = {**gen, "eos_token_id": out[0, len(ids) + eos_at_step].item()}
    save_hf(hf, {"bos_token_id": 1, "pad_token_id": 0, **gen}, path, tok, in_config_json=False)
    return path, transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def ours(lm: EvalModel, settings: GenerationSettings, prompts=PROMPTS) -> list[list[int]]:
    return lm.scorer.generate(prompts, lm.settings_for(settings), False, 2)


# -- min_length and min_new_tokens together: min_new_tokens alone -----------------------------


@pytest.mark.parametrize("step", [1, 3])
def test_min_new_tokens_set_leaves_min_length_unapplied_as_transformers(step):
    ids, logits = random_case()  # 12 tokens: the prompt's 12 - step, then step new ones
    prompt_len = ids.size(1) - step
    # transformers' generate() rewrites min_length to min_new_tokens + the prompt's length
    want = transformers.MinLengthLogitsProcessor(2 + prompt_len, [2])(ids, logits.clone())
    want = transformers.MinNewTokensLengthLogitsProcessor(prompt_len, 2, [2])(ids, want)
    got = LogitsRules(min_length=20, min_new_tokens=2).apply(logits, ids, None, step, 9, [2])
    assert torch.equal(got, want)
    assert torch.isinf(got[:, 2]).all() == (step < 2)  # min_length 20 would ban eos at any step


def test_settings_giving_both_minimums_decode_as_transformers(tmp_path, tok, caplog):
    path, hf = tiny_llama(tmp_path, tok, {"max_new_tokens": 12}, eos_at_step=1)
    lm = EvalModel.load(path)
    eos = lm.stop_ids()
    ids = lm.start(PROMPTS[0])
    assert len(ours(lm, GenerationSettings(), PROMPTS[:1])[0]) <= 2  # stops early unasked
    both = {"min_length": len(ids) + 10, "min_new_tokens": 3}
    resolved = lm.settings_for(GenerationSettings(**both))
    assert (resolved.min_length, resolved.min_new_tokens) == (0, 3)
    assert "min_new_tokens applies alone" in caplog.text
    for prompt, row in zip(PROMPTS, ours(lm, GenerationSettings(**both)), strict=True):
        start = lm.start(prompt)
        assert row == hf_new_ids(hf, start, len(start), eos, **both)
    zero = {"min_length": len(ids) + 10, "min_new_tokens": 0}  # 0 given: no minimum at all
    assert ours(lm, GenerationSettings(**zero), PROMPTS[:1]) == [
        hf_new_ids(hf, ids, len(ids), eos, **zero)
    ]


# -- beam-only options without beams: refused, not silently ignored ---------------------------


def test_length_penalty_without_beams_is_refused_and_with_beams_kept(tmp_path, tok):
    from lmforge.errors import ConfigError

    path, _ = tiny_llama(tmp_path, tok, {"max_new_tokens": 6})
    lm = EvalModel.load(path)
    for given in ({"length_penalty": 2.0}, {"early_stopping": True}):
        name = next(iter(given))
        with pytest.raises(ConfigError, match=f"{name}=.* beam search only.*num_beams > 1"):
            lm.settings_for(GenerationSettings(**given))
        assert lm.settings_for(GenerationSettings(num_beams=2, **given)).num_beams == 2
    assert lm.settings_for(GenerationSettings(length_penalty=1.0)).length_penalty == 1.0  # inert
    lm.generation_defaults = {"num_beams": 3, "length_penalty": 2.0}  # the checkpoint's beams
    assert lm.settings_for(GenerationSettings(length_penalty=0.5)).num_beams == 3
    assert lm.settings_for(GenerationSettings(num_beams=1)).length_penalty == 2.0  # its own: kept


def test_generate_cli_refuses_length_penalty_without_beams(tmp_path, tok):
    from typer.testing import CliRunner

    from lmforge.cli import app
    from lmforge.errors import ConfigError

    path, _ = tiny_llama(tmp_path, tok, {"max_new_tokens": 6})
    args = ["generate", "--model", str(path), "-p", "hello", "--length-penalty", "2"]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, ConfigError), result.output
    assert "--num-beams" in str(result.exception)
    result = CliRunner().invoke(app, [*args, "--num-beams", "2"])
    assert result.exit_code == 0, result.output


# -- the vectorized n-gram ban: transformers' processor, row by row ---------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorized_ngram_ban_equals_transformers_on_random_padded_histories(n, seed):
    from lmforge.model.logits_rules import ban_repeated_ngrams_

    g = torch.Generator().manual_seed(seed)
    B, T, V = 6, 40, 11  # a small vocabulary: many repeats to ban
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[:, 20:30] = ids[:, 30:40].clone()  # the last n - 1 tokens seen before: a sure ban
    logits = torch.randn(B, V, generator=g)
    lengths = torch.tensor([T, T - 1, 25, n, max(n - 1, 1), 1])  # short rows: nothing to ban
    written = logits.clone()
    got = ban_repeated_ngrams_(written, ids, lengths, n)
    assert got is written  # in place: no (B, V) copy
    for row in range(B):
        alone = ids[row : row + 1, T - int(lengths[row]) :]  # the row without its left padding
        want = transformers.NoRepeatNGramLogitsProcessor(n)(alone, logits[row : row + 1].clone())
        assert torch.equal(got[row : row + 1], want), row
    assert bool(torch.isinf(got[:3]).any())  # the long rows had n-grams to ban
    short = ban_repeated_ngrams_(logits.clone(), ids[:, : n - 1], lengths * 0 + n - 1, n)
    assert torch.equal(short, logits)


# -- a decoder checkpoint's max_length: the prompt included, max_new_tokens wins ----------------


def test_a_decoder_checkpoints_max_length_counts_the_prompt_as_transformers(tmp_path, tok):
    from lmforge.errors import InputError

    path, hf = tiny_llama(tmp_path, tok, {"eos_token_id": 2})
    lm = EvalModel.load(path)
    starts = [lm.start(p) for p in PROMPTS]
    longest = max(map(len, starts))
    assert len({len(s) for s in starts}) == len(PROMPTS)  # one batch would pad
    path, hf = tiny_llama(tmp_path, tok, {"eos_token_id": 2, "max_length": longest + 5})
    lm = EvalModel.load(path)
    assert lm.generation_defaults == {"max_length": longest + 5}
    for explicit in ({}, {"num_beams": 2}, {"max_new_tokens": 3}):
        rows = ours(lm, GenerationSettings(**explicit))
        for ids, row in zip(starts, rows, strict=True):
            assert row == hf_new_ids(hf, ids, len(ids), [2], **explicit)
        if not explicit:  # no stop in these: each prompt filled up to max_length
            assert [len(s) + len(r) for s, r in zip(starts, rows, strict=True)] == [longest + 5] * 3
    assert max(map(len, ours(lm, GenerationSettings(max_new_tokens=3)))) == 3  # given: wins
    with pytest.raises(InputError, match=f"prompt 0 has {len(starts[0])} tokens.*max_length"):
        ours(lm, GenerationSettings(max_length=len(starts[0])))
    lm.generation_defaults = {"max_length": longest + 5, "max_new_tokens": 2}
    lm.sets_max_new_tokens = True  # a checkpoint setting both: max_new_tokens wins
    assert max(map(len, ours(lm, GenerationSettings()))) == 2
    assert max(map(len, ours(lm, GenerationSettings(max_length=longest + 9)))) == 2  # still


# -- a checkpoint's sampling: `lmforge generate` follows it, eval records it as ignored ----------


def run_generate(path, tmp_path, *options: str):
    """`lmforge generate` on PROMPTS: (its answers, its output)."""
    from typer.testing import CliRunner

    from lmforge.cli import app

    out = tmp_path / "answers.jsonl"
    prompts = [a for p in PROMPTS for a in ("-p", p)]
    args = ["generate", "--model", str(path), "--out", str(out), *prompts, *options]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    return [json.loads(line)["completion"] for line in lines], result.output


def test_generate_cli_samples_as_the_checkpoint_says_unless_greedy(tmp_path, tok):
    # top_k 1: transformers' sampling is then deterministic, so ours can be compared token for token
    gen = {"do_sample": True, "temperature": 1.5, "top_k": 1, "max_new_tokens": 6}
    path, hf = tiny_llama(tmp_path, tok, gen)
    lm = EvalModel.load(path)
    answers, output = run_generate(path, tmp_path)
    assert "temperature=1.5, top_k=1, top_p=1.0 (transformers' default)" in output
    for prompt, answer in zip(PROMPTS, answers, strict=True):
        ids = lm.start(prompt)
        assert answer == lm.decode(hf_new_ids(hf, ids, len(ids), lm.stop_ids()))
    # a temperature given replaces the checkpoint's alone, as generate(temperature=...) does: its
    # top_k 1 still applies, so a flat temperature still picks the argmax
    hotter, output = run_generate(path, tmp_path, "--temperature", "20")
    assert hotter == answers and "top_k=1" in output and "temperature=1.5" not in output
    path, _ = tiny_llama(tmp_path, tok, {"do_sample": True, "max_new_tokens": 6})  # top_k 50
    lm = EvalModel.load(path)
    sampled, output = run_generate(path, tmp_path)
    assert "temperature=1.0 (transformers' default), top_k=50 (transformers' default)" in output
    want = lm.generate_batch(PROMPTS, GenerationSettings(temperature=1.0, top_k=50, top_p=1.0))
    assert sampled == want  # seed 0 as the command's default
    greedy, output = run_generate(path, tmp_path, "--greedy")
    assert greedy == lm.generate_batch(PROMPTS, GenerationSettings()) != sampled
    assert "temperature" not in output
    assert run_generate(path, tmp_path, "--temperature", "0")[0] == greedy  # explicit wins
    assert run_generate(path, tmp_path, "--top-k", "1")[0] == greedy  # top_k 1: the argmax
    beams = lm.generate_batch(PROMPTS, GenerationSettings(num_beams=2))
    assert run_generate(path, tmp_path, "--num-beams", "2")[0] == beams  # beams do not sample
    # the checkpoint's own beams with do_sample: beam sampling, not implemented, said so
    path, _ = tiny_llama(tmp_path, tok, {"do_sample": True, "num_beams": 2, "max_new_tokens": 6})
    _, output = run_generate(path, tmp_path)
    assert "num_beams=2 with do_sample is transformers' beam sampling" in output
    assert run_generate(path, tmp_path, "--greedy")[0] == beams  # --greedy: its beam search
    path, _ = tiny_llama(tmp_path, tok, {"do_sample": True, "top_k": 0, "max_new_tokens": 6})
    assert "top_k=0," in run_generate(path, tmp_path)[1]  # as written (0: off), not None


def test_eval_decodes_as_its_settings_and_records_the_sampling_keys_ignored(tmp_path, tok):
    from lmforge.config import validate
    from lmforge.evals import evaluate
    from lmforge.evals.stage import EvalConfig

    gen = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 5}
    path, hf = tiny_llama(tmp_path, tok, gen)
    lm = EvalModel.load(path)
    record = lm.checkpoint_record(GenerationSettings(), lm.settings_for(GenerationSettings()))
    assert record == {
        "used": {"max_new_tokens": 5},
        "ignored": {"do_sample": True, "temperature": 0.7, "top_p": 0.9},
    }
    for prompt, row in zip(PROMPTS, ours(lm, GenerationSettings()), strict=True):
        ids = lm.start(prompt)  # greedy, as transformers' generate(do_sample=False)
        assert row == hf_new_ids(hf, ids, len(ids), lm.stop_ids(), do_sample=False)
    three = GenerationSettings(max_new_tokens=3)
    assert lm.checkpoint_record(three, lm.settings_for(three))["used"] == {}
    task = {"name": "g", "type": "generation", "examples": [{"prompt": "a", "reference": "b"}]}
    cfg = validate(EvalConfig, {"models": [path], "tasks": [task], "out": tmp_path / "e"})
    versions = cfg.input_versions()
    ignored = next(v for k, v in versions.items() if k.startswith("generation_ignored:"))
    assert json.loads(ignored) == record["ignored"]  # recorded in eval.json: in the key too
    report = json.loads((evaluate(cfg) / "eval.json").read_text())
    (result,) = report["results"].values()
    assert result["g"]["generation"]["checkpoint"] == record
    assert result["g"]["generation"]["temperature"] == 0.0


# -- a fine-tune's export forces the token its answers end with --------------------------------


def test_a_chat_fine_tunes_export_forces_its_end_of_turn_in_transformers_too(tmp_path, tok):
    from types import SimpleNamespace

    from lmforge.common.io import atomic_path
    from lmforge.finetune.export import export_model
    from lmforge.model.convert import load_pretrained
    from lmforge.tokenizer.files import TokenizerFiles

    gen = {"eos_token_id": 7, "forced_eos_token_id": 7, "max_new_tokens": 5, "num_beams": 2}
    path, _ = tiny_llama(tmp_path, tok, gen)  # the base ends documents with 7, forced at the limit
    files = TokenizerFiles.load(path)
    im_end = files.token_id("<|im_end|>")
    assert im_end not in (None, 7)
    ctx = SimpleNamespace(out=tmp_path / "tuned", atomic_path=atomic_path)
    export_model(ctx, path, load_pretrained(path), files)
    final = tmp_path / "tuned" / "final"
    written = json.loads((final / "generation_config.json").read_text())
    assert written["forced_eos_token_id"] == im_end and written["num_beams"] == 2
    assert written["eos_token_id"] == [7, im_end]  # the base's stop kept, the reply's added
    lm = EvalModel.load(final)
    hf = transformers.AutoModelForCausalLM.from_pretrained(final).eval()
    rows = lm.scorer.generate(PROMPTS, lm.settings_for(GenerationSettings()), True, 2)
    for prompt, row in zip(PROMPTS, rows, strict=True):
        ids = lm.encode(lm.render_chat(prompt))
        assert row == hf_new_ids(hf, ids, len(ids), lm.stop_ids())
        assert row[-1] in (7, im_end) and (len(row) < 5 or row[-1] == im_end)
    assert max(map(len, rows)) == 5  # one answer ran to the limit: ended by the end of turn


def test_a_plain_fine_tunes_export_forces_its_eos_in_transformers_too(tmp_path, tok):
    """No chat template: the tuned model ends its texts with the tokenizer's eos, so a forced
    eos naming the base's end moves there, and transformers' generate() ends on it too."""
    from types import SimpleNamespace

    from lmforge.common.io import atomic_path
    from lmforge.finetune.export import export_model
    from lmforge.model.convert import load_pretrained
    from lmforge.tokenizer.files import TokenizerFiles

    gen = {"eos_token_id": 7, "forced_eos_token_id": 7, "max_new_tokens": 5}
    path, _ = tiny_llama(tmp_path, tok, gen)  # the base ends documents with 7, forced at the limit
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["chat_template"]  # a plain decoder's tokenizer: eos is its only end
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    files = TokenizerFiles.load(path)
    assert files.chat_template is None and files.eos_id not in (None, 7)
    ctx = SimpleNamespace(out=tmp_path / "tuned", atomic_path=atomic_path)
    export_model(ctx, path, load_pretrained(path), files)
    final = tmp_path / "tuned" / "final"
    written = json.loads((final / "generation_config.json").read_text())
    assert written["forced_eos_token_id"] == files.eos_id  # moved from the base's 7
    lm = EvalModel.load(final)
    assert set(lm.stop_ids()) == {7, files.eos_id}
    hf = transformers.AutoModelForCausalLM.from_pretrained(final).eval()
    rows = lm.scorer.generate(PROMPTS, lm.settings_for(GenerationSettings()), False, 2)
    for prompt, row in zip(PROMPTS, rows, strict=True):
        ids = lm.start(prompt)
        assert row == hf_new_ids(hf, ids, len(ids), lm.stop_ids())
        assert len(row) < 5 or row[-1] == files.eos_id
    assert max(map(len, rows)) == 5  # one text ran to the limit: ended by the forced eos


def test_export_moves_a_forced_eos_only_when_it_named_the_bases_end(tmp_path, tok):
    """An encoder-decoder's export passes its own eos as the end: a forced eos among the base's
    eos ids moves there, one naming another token stays, and no end known leaves it as is."""
    import shutil

    from lmforge.finetune.export import answer_end, tuned_decoding
    from lmforge.tokenizer.files import TokenizerFiles

    base = shutil.copytree(tok, tmp_path / "base")
    files = TokenizerFiles.load(base)

    def moved(forced, end: int | None = 9):
        gen = {"eos_token_id": [2, 3], "forced_eos_token_id": forced, "num_beams": 4}
        (base / "generation_config.json").write_text(json.dumps(gen))
        return tuned_decoding(base, files, end)

    assert moved(2) == {"forced_eos_token_id": 9, "num_beams": 4}
    assert moved([2, 3])["forced_eos_token_id"] == 9
    assert moved(7)["forced_eos_token_id"] == 7  # not the base's end: the base's own choice
    assert moved([2, 7])["forced_eos_token_id"] == [2, 7]
    assert moved(2, end=None)["forced_eos_token_id"] == 2
    assert answer_end(files) == files.token_id("<|im_end|>")  # a chat template: its end of turn


def test_sampling_keys_lmforge_does_not_apply_are_named_when_the_checkpoint_samples(tmp_path):
    from lmforge.model.generation_defaults import unapplied_keys, warn_not_applied

    gen = {"do_sample": True, "temperature": 0.7, "min_p": 0.1, "typical_p": 1.0}
    (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    assert warn_not_applied(tmp_path) == ["min_p"]  # `lmforge generate` samples without it
    assert unapplied_keys(tmp_path, sampling_applied=False) == {
        "min_p": 0.1, "do_sample": True, "temperature": 0.7,
    }  # fmt: skip
    (tmp_path / "generation_config.json").write_text(json.dumps({**gen, "do_sample": False}))
    assert warn_not_applied(tmp_path) == []  # transformers does not sample: min_p unused
