"""Structured outputs offline: `lmforge generate --json-schema/--regex/--choice` on a tiny random
model. Sampled JSON answers parse and validate (several seeds), regex answers fullmatch, choices
are one of the choices; a batch of prompts of mixed lengths answers as each prompt alone; bad or
clashing constraints are errors that name the flag. The model is serve's micro chat model (peaky
weights: answers vary and end within the budget); tests/unit/serve/test_offline_guided_parity.py
checks that greedy answers are the serving engine's."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.constrain import compiler_for
from lmforge.errors import ConfigError
from lmforge.evals.lm import EvalModel, GenerationSettings
from lmforge.model.generate import generate
from lmforge.model.logits_rules import LogitsRules
from lmforge.tokenizer.files import TokenizerFiles, copy_tokenizer_files
from unit.finetune.helpers import make_tokenizer_dir
from unit.serve.conftest import micro_model, write_micro_model_dir

SCHEMA = {  # strings and arrays bounded: a random model's answers end within the budget
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "size": {"enum": ["S", "M", 1, None]},
        "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "size"],
    "additionalProperties": False,
}
PROMPTS = ["Hi", "A much longer prompt, with several more tokens in it", "JSON please:"]


@pytest.fixture(scope="module")
def serve_model_dir(tmp_path_factory) -> Path:
    """serve's micro chat model (tests/unit/serve/conftest.py), written here."""
    return write_micro_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def lm(serve_model_dir) -> EvalModel:
    return EvalModel.load(serve_model_dir)


def run_cli(serve_model_dir: Path, out: Path, *options: str):
    prompts = [a for p in PROMPTS for a in ("-p", p)]
    args = ["generate", "--model", str(serve_model_dir), "--out", str(out), *prompts, *options]
    return CliRunner().invoke(app, args)


def answers(out: Path) -> list[str]:
    return [json.loads(line)["completion"] for line in out.read_text().splitlines()]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cli_json_schema_answers_validate(serve_model_dir, tmp_path, seed):
    import jsonschema

    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    given = str(schema_file) if seed else json.dumps(SCHEMA)  # a file, or the schema's text
    out = tmp_path / "answers.jsonl"
    result = run_cli(serve_model_dir, out, "--json-schema", given, "--temperature", "1.0",
                     "--seed", str(seed), "--num-samples", "2", "--max-new-tokens", "100")  # fmt: skip
    assert result.exit_code == 0, result.output
    texts = answers(out)
    assert len(texts) == 2 * len(PROMPTS)
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 1  # sampled: not one answer repeated


def test_cli_regex_and_choice(serve_model_dir, tmp_path):
    out = tmp_path / "regex.jsonl"
    result = run_cli(
        serve_model_dir, out, "--regex", r"[a-c]{2,5}-\d{1,3}", "--max-new-tokens", "20"
    )
    assert result.exit_code == 0, result.output
    for text in answers(out):
        assert re.fullmatch(r"[a-c]{2,5}-\d{1,3}", text), text
    out = tmp_path / "choice.jsonl"
    options = ["--choice", "yes", "--choice", "no way", "--temperature", "1.0"]
    result = run_cli(serve_model_dir, out, *options, "--num-samples", "4")
    assert result.exit_code == 0, result.output
    texts = answers(out)
    assert set(texts) <= {"yes", "no way"} and len(texts) == 4 * len(PROMPTS)


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--regex", "a+", "--choice", "a"], "regex, choice: only one output constraint at a time"),
        (["--choice", "a", "--num-beams", "2"], "choice (--choice) with num_beams=2"),
        (["--regex", "a(b"], "regex (--regex):"),
        (["--json-schema", "{not json"], "--json-schema is not JSON"),
        (["--json-schema", "[1]"], "--json-schema must be a JSON object"),
        (["--json-schema", "nofile.json"], "--json-schema nofile.json: no such file"),
        (["--json-schema", '{"type": "object", "patternProperties": {}}'], "(--json-schema):"),
        (["--regex", "a+", "--draft-model", "."], "--draft-model with --json-schema/--regex"),
    ],
)
def test_cli_bad_or_clashing_constraints_name_the_flag(serve_model_dir, tmp_path, options, says):
    result = run_cli(serve_model_dir, tmp_path / "x.jsonl", *options)
    assert result.exit_code != 0
    assert says in str(result.exception) + result.output
    assert not (tmp_path / "x.jsonl").exists()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_batch_of_mixed_lengths_answers_as_each_prompt_alone(lm, temperature):
    settings = GenerationSettings(max_new_tokens=100, json_schema=SCHEMA, temperature=temperature)
    batched = lm.generate_batch(PROMPTS, settings, batch_size=len(PROMPTS))
    if temperature == 0:  # greedy: each prompt alone
        alone = [lm.generate_batch([p], settings)[0] for p in PROMPTS]
    else:  # sampled: prompt i draws from its own generator, whatever its batch
        alone = lm.generate_batch(PROMPTS, settings, batch_size=1)
    assert batched == alone
    assert all(json.loads(text)["name"] is not None for text in batched)


def test_a_complete_answer_ends_though_rules_hold_off_the_stop_token(lm):
    settings = GenerationSettings(max_new_tokens=30, choice=["yes"], min_new_tokens=25)
    assert lm.generate_batch(PROMPTS, settings) == ["yes"] * len(PROMPTS)


def test_rules_that_ban_every_allowed_token_yield_to_the_grammar(lm, monkeypatch):
    """Where the answer may end and the model wants only the stop token or text the grammar
    refuses, a min_new_tokens ban on the stop token leaves nothing: the grammar wins, and the
    row takes the stop token under the raw logits."""
    from lmforge.constrain.rows import GuidedRow

    (a,), (c,), stop = lm.encode("a"), lm.encode("c"), lm.stop_ids()[0]
    row = GuidedRow(compiler_for(lm.files).compile("regex", "a|ab"), [stop])
    assert row.advance(a) is False  # "a": it may end, or go on with "b"
    logits = torch.full((1, lm.model.config.vocab_size), float("-inf"))
    logits[0, [stop, c]] = 0.0  # a model that wants the stop token or "c"
    module = sys.modules[generate.__module__]  # lmforge.model re-exports the function's name
    monkeypatch.setattr(module, "last_logits", lambda *a, **k: logits.clone())
    ids = torch.tensor([lm.start("x")])
    out = generate(lm.model, ids, 3, greedy=True, stop_tokens=[stop], constraints=[row],
                   rules=LogitsRules(min_new_tokens=5))  # fmt: skip
    assert out[0, ids.size(1) :].tolist() == [stop]  # ended at once, at its stop token
    free = generate(lm.model, ids, 3, greedy=True, stop_tokens=[stop],
                    rules=LogitsRules(min_new_tokens=5))  # fmt: skip
    assert free[0, ids.size(1)].item() == c  # without the grammar, the rules win


def test_a_seq2seq_model_refuses_output_constraints(tmp_path):
    from lmforge.model.config import preset_config
    from lmforge.model.convert import save_pretrained
    from lmforge.model.seq2seq import Seq2SeqLM
    from unit.evals.family_dirs import SEQ2SEQ_IDS

    tok = make_tokenizer_dir(tmp_path / "tok")
    vocab = TokenizerFiles.load(tok).vocab_size
    torch.manual_seed(0)
    s2s = Seq2SeqLM(preset_config("bart-micro", vocab_size=vocab))
    save_pretrained(s2s, tmp_path / "bart", extra_config=SEQ2SEQ_IDS, generation_config=SEQ2SEQ_IDS)
    copy_tokenizer_files(tok, tmp_path / "bart")
    bart = EvalModel.load(tmp_path / "bart")
    with pytest.raises(ConfigError, match="seq2seq model: output constraints"):
        bart.generate_batch(["x"], GenerationSettings(regex="a+"))


def test_settings_refuse_two_constraints_and_an_empty_choice():
    with pytest.raises(ValueError, match="json_schema, regex: only one output constraint"):
        GenerationSettings(json_schema=SCHEMA, regex="a")
    with pytest.raises(ValueError, match="choice"):
        GenerationSettings(choice=[])
    assert GenerationSettings(choice=["a", "b"]).output_constraint() == ("choice", '["a","b"]')
    assert GenerationSettings().output_constraint() is None


def test_an_eval_generation_task_follows_its_constraint(lm):
    from lmforge.evals.task_format import TaskSpec
    from lmforge.evals.task_runners import run_generation

    examples = [{"prompt": p, "reference": "yes"} for p in PROMPTS]
    asked = GenerationSettings(choice=["yes", "no"], temperature=1.0)
    spec = TaskSpec(type="generation", examples=examples, generation=asked, chat=False)
    result = run_generation(lm, spec, GenerationSettings())
    assert {r["output"] for r in result.records} <= {"yes", "no"}
    assert result.metrics["generation"]["choice"] == ["yes", "no"]  # recorded beside the scores
    hits = [r["output"] == "yes" for r in result.records]
    assert result.metrics["exact_match"] == pytest.approx(sum(hits) / len(hits))


def test_settings_without_a_constraint_keep_their_cache_hashes():
    """json_schema/regex/choice are HASHED_IF_SET: eval results cached before they existed stay
    valid. The hashes are those of GenerationSettings at e5050a9, before the constraints."""
    from lmforge.config import config_hash, hashed_dump

    assert config_hash(GenerationSettings()) == "4700e5616940f13f"
    sampled = {"temperature": 0.7, "top_p": 0.9, "stop": ["\n"], "max_new_tokens": 20, "seed": 3}
    assert config_hash(GenerationSettings(**sampled)) == "35df1878f7c37e8a"
    hashes = {config_hash(GenerationSettings(**sampled, **{k: v})) for k, v in
              [("json_schema", SCHEMA), ("regex", "a+"), ("choice", ["a"]), ("choice", ["b"])]}  # fmt: skip
    assert len(hashes) == 4 and "35df1878f7c37e8a" not in hashes
    assert hashed_dump(GenerationSettings(regex="a+"))["regex"] == "a+"


@pytest.mark.parametrize("kind", ["regex", "choice"])
def test_cli_chat_answers_follow_the_constraint(serve_model_dir, tmp_path, kind):
    """--chat renders each prompt with the chat template; the answer still follows the
    constraint, and ends at the template's end of turn (a stop token) where the grammar may."""
    out = tmp_path / "chat.jsonl"
    given = ["--regex", "[a-c]{1,8}"] if kind == "regex" else ["--choice", "yes", "--choice", "no"]
    result = run_cli(serve_model_dir, out, "--chat", *given, "--temperature", "1.0",
                     "--num-samples", "3", "--max-new-tokens", "30")  # fmt: skip
    assert result.exit_code == 0, result.output
    texts = answers(out)
    assert len(texts) == 3 * len(PROMPTS)
    if kind == "regex":
        assert all(re.fullmatch("[a-c]{1,8}", t) for t in texts), texts
    else:
        assert set(texts) <= {"yes", "no"}


def test_chat_sampled_batch_answers_as_each_prompt_alone(lm):
    settings = GenerationSettings(max_new_tokens=40, regex="[a-c]{1,30}", temperature=1.0)
    batched = lm.generate_batch(PROMPTS, settings, chat=True, batch_size=len(PROMPTS))
    assert batched == lm.generate_batch(PROMPTS, settings, chat=True, batch_size=1)
    assert all(re.fullmatch("[a-c]{1,30}", t) for t in batched)
    assert batched != lm.generate_batch(PROMPTS, settings)  # the chat template was applied


def test_a_checkpoints_beams_give_way_to_a_constraint(tmp_path):
    """generation_config.json's num_beams is the checkpoint's default, not the user's ask: a
    constraint decodes without beams (as sampling does), where an explicit --num-beams is
    refused."""
    from lmforge.config import validate
    from lmforge.model.convert import save_pretrained

    tok = make_tokenizer_dir(tmp_path / "tok")
    out = tmp_path / "beamy"
    model = micro_model(TokenizerFiles.load(tok).vocab_size)
    save_pretrained(model, out, generation_config={"num_beams": 3})
    copy_tokenizer_files(tok, out)
    beamy = EvalModel.load(out)
    asked = validate(GenerationSettings, {"regex": "[a-c]{1,6}", "max_new_tokens": 8}, "t")
    assert beamy.settings_for(asked).num_beams == 1
    (text,) = beamy.generate_batch(["Hi"], asked)
    assert re.fullmatch("[a-c]{1,6}", text)
    assert beamy.settings_for(GenerationSettings()).num_beams == 3  # unconstrained: beams
    with pytest.raises(ConfigError, match=re.escape("regex (--regex) with num_beams=2")):
        validate(GenerationSettings, {"regex": "a", "num_beams": 2}, "t")
    result = CliRunner().invoke(app, ["generate", "--model", str(out), "--out", str(tmp_path / "a"),
                                      "-p", "Hi", "--regex", "[a-c]{1,6}"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "the checkpoint's num_beams=3: beam search does not follow" in result.output
