"""Request parsing (400s that name the field) and the server settings, without a server."""

from __future__ import annotations

import json

import pytest

from lmforge.errors import ConfigError
from lmforge.model.convert import model_display_name
from lmforge.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    LogprobsBuilder,
    parse_request,
)
from lmforge.serve.settings import (
    ENV_CONFIG,
    ServeSettings,
    parse_model_specs,
    run_dir,
    settings_from_env,
)


def param_of(model, body) -> str | None:
    with pytest.raises(APIError) as err:
        parse_request(model, body)
    assert err.value.status == 400
    return err.value.param


def test_unknown_fields_are_ignored_and_stop_becomes_a_list():
    req = parse_request(
        CompletionRequest, {"model": "m", "prompt": "hi", "stop": "\n", "frequency_penalty": 0}
    )
    assert req.stop_list == ["\n"] and req.prompts() == ["hi"]
    assert parse_request(CompletionRequest, {"model": "m", "prompt": [1, 2]}).prompts() == [[1, 2]]
    assert parse_request(CompletionRequest, {"model": "m", "prompt": ["a", "b"]}).prompts() == [
        "a",
        "b",
    ]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "prompt": "x", "temperature": "hot"}, "temperature"),
        ({"model": "m", "prompt": "x", "temperature": 3}, "temperature"),
        ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "prompt": "x", "n": 0}, "n"),
        ({"model": "m", "prompt": "x", "logprobs": 9}, "logprobs"),
        ({"model": "m", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "m", "prompt": []}, "prompt"),
        ({"prompt": "x"}, "model"),
    ],
)
def test_completion_errors_name_the_field(body, param):
    assert param_of(CompletionRequest, body) == param


def test_chat_messages():
    req = parse_request(
        ChatRequest,
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
            ],
            "max_tokens": 5,
            "max_completion_tokens": 7,
        },
    )
    assert req.plain_messages() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
    ]
    assert req.token_limit == 7
    assert param_of(ChatRequest, {"model": "m", "messages": []}) == "messages"
    assert param_of(ChatRequest, {"model": "m", "messages": [{"role": "x"}]}) == "messages.0.role"
    image = parse_request(
        ChatRequest,
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
    )
    with pytest.raises(APIError, match="image_url"):
        image.plain_messages()


def test_body_must_be_an_object():
    assert param_of(CompletionRequest, [1]) is None


def test_logprobs_layouts():
    b = LogprobsBuilder(chat=False)
    b.add("he", -0.1, {"he": -0.1, "x": -3.0})
    b.add("llo", -0.2, {"llo": -0.2})
    assert b.build() == {
        "tokens": ["he", "llo"],
        "token_logprobs": [-0.1, -0.2],
        "top_logprobs": [{"he": -0.1, "x": -3.0}, {"llo": -0.2}],
        "text_offset": [0, 2],
    }
    assert b.build(1)["tokens"] == ["llo"]
    c = LogprobsBuilder(chat=True)
    c.add("é", -1.0, {"é": -1.0})
    row = c.build()["content"][0]
    assert row["bytes"] == [195, 169] and row["top_logprobs"][0]["token"] == "é"


def test_model_names_and_specs(tmp_path):
    final = tmp_path / "runs" / "q" / "sft" / "final"
    final.mkdir(parents=True)
    (final.parent / "manifest.json").write_text("{}")
    other = tmp_path / "mine"
    other.mkdir()
    assert model_display_name(final) == "sft" and model_display_name(other) == "mine"
    assert run_dir(final) == tmp_path / "runs" / "q" and run_dir(other) is None
    specs = parse_model_specs([str(final), f"base={other}"])
    assert [(s.name, s.path) for s in specs] == [("sft", final), ("base", other)]
    with pytest.raises(ConfigError, match="used twice"):
        parse_model_specs([f"a={final}", f"a={other}"])
    with pytest.raises(ConfigError, match="not a directory"):
        parse_model_specs([str(tmp_path / "missing")])
    settings = ServeSettings(models=specs)
    assert settings.feedback_path() == tmp_path / "runs" / "q" / "feedback.db"
    assert settings.kb_path() == tmp_path / "runs" / "q" / "kb.db"


def test_settings_from_env(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_CONFIG, raising=False)
    with pytest.raises(ConfigError, match=ENV_CONFIG):
        settings_from_env()
    s = ServeSettings(models=[{"name": "m", "path": tmp_path}], port=9)
    monkeypatch.setenv(ENV_CONFIG, s.model_dump_json())
    assert settings_from_env() == s
    monkeypatch.setenv(ENV_CONFIG, json.dumps({"models": [], "port": 1}))
    with pytest.raises(ConfigError):
        settings_from_env()
