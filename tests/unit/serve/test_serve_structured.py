"""Structured outputs end to end: a real uvicorn on 127.0.0.1, the official openai client, a tiny
random model. JSON-schema answers parse and validate (several seeds, n=3, streamed and not),
json_object answers are objects, a choice is one of the choices, a regex answer fullmatches, and
bad constraints are 400s that say what is wrong. In the engine: the logprobs of a guided token
stay the raw model's, and stop strings wait for min_tokens."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")

import openai
import torch

from lmforge.constrain import compiler_for
from lmforge.model.logits_rules import NO_RULES
from lmforge.serve.engine import SamplingParams, collect

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "level": {"enum": ["low", "high", 3]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
        "ok": {"type": "boolean"},
        "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 4}]},
    },
    "required": ["name", "level", "ok"],
    "additionalProperties": False,
}
CHAT = [{"role": "user", "content": "JSON?"}]


@pytest.fixture(scope="module")
def client(serve_model_dir, tmp_path_factory, openai_server):
    db = tmp_path_factory.mktemp("structured") / "f.db"
    return openai_server([{"name": "m", "path": serve_model_dir}], feedback_db=db)


def schema_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}}


def check_schema_answers(texts):
    import jsonschema

    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_answers_validate_streamed_and_not(client, seed):
    ask = dict(model="m", messages=CHAT, max_tokens=80, n=3, seed=seed, temperature=1.0,
               response_format=schema_format(SCHEMA))  # fmt: skip
    whole = client.chat.completions.create(**ask)
    assert [c.finish_reason for c in whole.choices] == ["stop"] * 3
    check_schema_answers([c.message.content for c in whole.choices])
    texts = ["", "", ""]
    for chunk in client.chat.completions.create(**ask, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    check_schema_answers(texts)
    assert texts == [c.message.content for c in whole.choices]  # seeded: the same answers


def test_json_object_mode_on_completions_gives_objects(client):
    finished = []
    for seed in range(6):  # a random model may write one long string until max_tokens
        out = client.completions.create(
            model="m", prompt="A JSON object:", max_tokens=60, n=4, seed=seed,
            extra_body={"response_format": {"type": "json_object"}},  # vLLM takes it here too
        )  # fmt: skip
        finished += [c.text for c in out.choices if c.finish_reason == "stop"]
        assert all(c.text.startswith("{") for c in out.choices)
    assert len(finished) >= 4
    assert all(isinstance(json.loads(text), dict) for text in finished)


def test_vllm_guided_json_as_text_on_completions(client):
    schema = {"type": "array", "items": {"enum": [1, "two", None]}, "minItems": 2, "maxItems": 3}
    out = client.completions.create(
        model="m", prompt="A list:", max_tokens=30, n=3, seed=11,
        extra_body={"guided_json": json.dumps(schema)},
    )  # fmt: skip
    for choice in out.choices:
        items = json.loads(choice.text)
        assert 2 <= len(items) <= 3 and all(i in (1, "two", None) for i in items)


def test_choice_and_regex(client):
    choices = ["red", "green", "blue sky"]
    answers = set()
    for seed in range(4):
        out = client.chat.completions.create(
            model="m", messages=CHAT, max_tokens=10, seed=seed, n=2,
            extra_body={"guided_choice": choices},
        )  # fmt: skip
        answers |= {c.message.content for c in out.choices}
        assert all(c.finish_reason == "stop" for c in out.choices)
    assert answers <= set(choices)
    pattern = r"(ID|id)-[0-9a-f]{2,4}(\.[xy]+)?"
    for stream in (False, True):
        out = client.completions.create(
            model="m", prompt="Code:", max_tokens=30, seed=3, n=3, stream=stream,
            extra_body={"guided_regex": pattern},
        )  # fmt: skip
        if stream:
            texts = ["", "", ""]
            for chunk in out:
                for c in chunk.choices:
                    texts[c.index] += c.text
        else:
            texts = [c.text for c in out.choices]
        assert all(re.fullmatch(pattern, t) for t in texts), texts


def test_greedy_guided_answers_are_cached_apart_and_cut_at_stop_strings(client):
    ask = dict(model="m", messages=CHAT, max_tokens=10, temperature=0)
    free = client.chat.completions.create(**ask).choices[0].message.content  # now cached
    guided = dict(extra_body={"guided_choice": ["alpha-beta", "gamma"]})
    first = client.chat.completions.create(**ask, **guided).choices[0].message.content
    assert first in ("alpha-beta", "gamma") and first != free  # the cache key has the guide
    cut = client.chat.completions.create(**ask, **guided, stop=["-"]).choices[0].message.content
    assert cut == first.split("-")[0]


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"response_format": schema_format({"type": "string", "pattern": "^a+$"})},
         "unsupported JSON schema keyword 'pattern' at #"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": {
            "type": "object", "properties": {"n": {"type": "number", "maximum": 3}}}}}},
         "'maximum' at #/properties/n"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "needs a 'json_schema' object"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a+"},
         "one structured-output constraint, got response_format and guided_regex"),
        ({"guided_regex": "(?<=a)b"}, "group syntax '(?'"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_json": "{not json"}, "guided_json is not valid JSON"),
    ],
)  # fmt: skip
def test_bad_constraints_are_400s_that_say_why(client, extra, says):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", messages=CHAT, max_tokens=5, extra_body=extra)
    assert says in err.value.body["message"]


def test_an_unusable_schema_gets_openais_error_body(client):
    bad = {"type": "string", "pattern": "^a+$"}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="m", messages=CHAT, max_tokens=5, response_format=schema_format(bad)
        )
    body = err.value.body
    assert body["message"].startswith("Invalid schema for response_format 't': unsupported")
    assert (body["type"], body["param"], body["code"]) == (
        "invalid_request_error", "response_format", "invalid_json_schema",
    )  # fmt: skip
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(
            model="m", prompt="x", max_tokens=5, extra_body={"guided_json": bad}
        )
    assert err.value.body["message"].startswith("Invalid schema for guided_json: unsupported")
    assert err.value.body["param"] == "guided_json"


def test_guided_logprobs_stay_the_raw_models(engine):
    files = engine.files
    prompt = files.encode("Pick one:")
    guide = compiler_for(files).compile("choice", json.dumps(["zq", "zzq"]))
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=2, guide=guide)
    events = list(engine.submit(prompt, params, "guided-lp"))
    assert "".join(e.text for e in events) in ("zq", "zzq")
    with torch.inference_mode():
        raw = torch.log_softmax(engine.model(torch.tensor([prompt]))[0, -1].float(), dim=-1)
    first = events[0]
    assert first.logprob == pytest.approx(raw[first.token_id].item(), abs=1e-4)
    assert max(first.top_logprobs.values()) == pytest.approx(raw.max().item(), abs=1e-4)


def test_stop_strings_wait_for_min_tokens(engine):
    files = engine.files
    prompt = files.encode("Hello there")
    plain = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    free = collect(engine.submit(prompt, plain, "free"))
    stop = free.text[2:4]  # a stop string the greedy answer writes early
    assert len(stop) == 2 and free.text.find(stop) < len(free.text) - 4

    def answer(min_tokens: int):
        rules = replace(NO_RULES, min_new_tokens=min_tokens)
        params = replace(plain, stop=(stop,), rules=rules)
        return collect(engine.submit(prompt, params, f"stop-{min_tokens}"))

    early = answer(0)
    assert early.text == free.text[: free.text.find(stop)] and early.finish_reason == "stop"
    late = answer(24)  # stop strings ignored for the whole answer
    assert late.text == free.text and late.finish_reason == "length"


def test_rules_that_ban_every_allowed_token_yield_to_the_grammar(engine):
    from lmforge.serve.guided_rows import guided_logits
    from lmforge.serve.handle import RequestHandle
    from lmforge.serve.request_book import Row

    guide = compiler_for(engine.files).compile("choice", json.dumps(["zq", "q"]))
    guided = Row(RequestHandle("g", 1), [1], SamplingParams(guide=guide), frozenset())
    free = Row(RequestHandle("f", 1), [1], SamplingParams(), frozenset())
    raw = torch.randn(2, engine.vocab_size)
    ruled = raw.clone()
    ruled[0] = float("-inf")  # say, min_tokens banning the only tokens the grammar allows
    out = guided_logits([guided, free], ruled, raw)
    allowed = guide.tokens.allowed(guided.guide_state)
    assert allowed.sum() >= 2 and torch.equal(torch.isfinite(out[0]), allowed)
    assert torch.equal(out[0][allowed], raw[0][allowed])  # the raw logits, under the mask
    assert torch.equal(out[1], raw[1])  # an unguided row is left as it is
    assert torch.isinf(ruled[0]).all()  # the caller's tensors are not written


def test_a_complete_answer_ends_even_when_stop_tokens_are_ignored(engine):
    guide = compiler_for(engine.files).compile("choice", json.dumps(["zq"]))
    params = SamplingParams(max_tokens=12, temperature=0.7, seed=1, ignore_eos=True, guide=guide)
    done = collect(engine.submit(engine.files.encode("Hi"), params, "complete"))
    assert (done.text, done.finish_reason) == ("zq", "stop")


def test_a_grammar_the_vocabulary_cannot_write_fails_the_row_saying_so():
    from lmforge.constrain import Automaton, TokenGuide, Vocabulary
    from lmforge.constrain.guide import _bound
    from lmforge.constrain.regex import regex_grammar
    from lmforge.serve.guided_rows import advance_guide, guided_logits
    from lmforge.serve.handle import RequestHandle
    from lmforge.serve.request_book import Row

    tokens = TokenGuide(Automaton(regex_grammar("aé")), Vocabulary([b"", b"a", b"b"]))
    guide = _bound("regex", "aé", tokens)
    row = Row(RequestHandle("r", 1), [1], SamplingParams(guide=guide), frozenset())
    row.generated = 1
    assert advance_guide(row, 1) is False  # "a": fine so far
    out = guided_logits([row], torch.zeros(1, 3), torch.zeros(1, 3))
    assert torch.isinf(out).all()  # nothing can follow: no token writes "é"
    row.generated = 2
    with pytest.raises(RuntimeError, match="regex constraint cannot go on after 1 tokens"):
        advance_guide(row, 2)  # whatever the draw made of a row of -inf


def test_a_stop_token_that_is_also_text_is_allowed_only_where_the_answer_may_end():
    from lmforge.constrain import Automaton, TokenGuide, Vocabulary
    from lmforge.constrain.guide import _bound
    from lmforge.constrain.regex import regex_grammar
    from lmforge.serve.guided_rows import advance_guide, guided_logits
    from lmforge.serve.handle import RequestHandle
    from lmforge.serve.request_book import Row

    tokens = TokenGuide(Automaton(regex_grammar("(a|b)b")), Vocabulary([b"", b"a", b"b"]))
    params = SamplingParams(guide=_bound("regex", "(a|b)b", tokens))
    row = Row(RequestHandle("r", 1), [1], params, frozenset({1}))  # "a" is also a stop token
    logits = torch.zeros(1, 3)
    assert torch.isfinite(guided_logits([row], logits, logits)[0]).tolist() == [0, 0, 1]
    assert advance_guide(row, 2) is False
    assert torch.isfinite(guided_logits([row], logits, logits)[0]).tolist() == [0, 0, 1]
    assert advance_guide(row, 2) is True  # "bb": complete
    assert torch.isfinite(guided_logits([row], logits, logits)[0]).tolist() == [0, 1, 0]
