"""`lmforge serve --generation-config auto|none`: a checkpoint's generation_config fills the request
fields a request leaves unset (as vLLM does), so a greedy chat answers as `lmforge generate --chat`
does on the same model (no-repeat n-grams, min new tokens, max new tokens); a field the request
sets wins; `none` and our own exports (no such keys) answer as before. Real uvicorn on 127.0.0.1,
read by the openai client."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("openai")

import openai

from lmforge.evals.lm import EvalModel, GenerationSettings
from lmforge.model.logits_rules import LogitsRules
from lmforge.serve.emit import history_rules
from lmforge.serve.launch import free_port
from lmforge.serve.request_book import Row
from lmforge.serve.request_defaults import NO_DEFAULTS, RequestDefaults, read_request_defaults
from lmforge.serve.row_batch import RowBatch
from lmforge.serve.sampling import SamplingParams
from lmforge.serve.server import create_app
from lmforge.serve.settings import ServeSettings
from lmforge.tokenizer.files import TokenizerFiles
from lmforge.tokenizer.generation import generation_config
from unit.finetune.helpers import make_model_dir, make_tokenizer_dir
from unit.serve.test_serve_uvicorn import running

CHECKPOINT_KEYS = {"no_repeat_ngram_size": 1, "min_new_tokens": 10, "max_new_tokens": 10}
QUESTION = [{"role": "user", "content": "Hello there"}]


def with_generation_config(model_dir: Path, **keys) -> Path:
    """model_dir with a generation_config.json: the stop set lmforge writes, plus these keys."""
    base = generation_config(TokenizerFiles.load(model_dir))
    (model_dir / "generation_config.json").write_text(json.dumps({**base, **keys}))
    return model_dir


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """The same micro chat model twice: as we export it, and with a checkpoint's settings."""
    tmp = tmp_path_factory.mktemp("gencfg")
    tok = make_tokenizer_dir(tmp / "tok")
    plain = make_model_dir(tmp / "plain", tok, init_std=0.2)
    ruled = with_generation_config(
        make_model_dir(tmp / "ruled", tok, init_std=0.2), **CHECKPOINT_KEYS
    )
    return {"plain": plain, "ruled": ruled}


def chat_answers(model_dirs: dict[str, Path], tmp_path: Path, mode: str, **ask) -> dict[str, tuple]:
    """Each model's (text, completion tokens) for QUESTION, greedy, from a server
    with --generation-config mode."""
    settings = ServeSettings(
        models=[{"name": n, "path": p} for n, p in model_dirs.items()],
        feedback_db=tmp_path / f"{mode}.db", port=free_port(), generation_config=mode,
    )  # fmt: skip
    out = {}
    with running(settings, create_app(settings)):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{settings.port}/v1", api_key="-")
        for name in model_dirs:
            r = client.chat.completions.create(model=name, messages=QUESTION, temperature=0, **ask)
            out[name] = (r.choices[0].message.content, r.usage.completion_tokens)
    return out


def generate_chat(model_dir: Path, settings: GenerationSettings, defaults: bool = True) -> str:
    """What `lmforge generate --chat` answers (EvalModel, the defaults it reads included)."""
    lm = EvalModel.load(model_dir)
    if not defaults:
        lm.generation_defaults = {}
    return lm.generate(QUESTION[0]["content"], settings, chat=True)


def test_auto_answers_as_lmforge_generate_and_a_request_field_wins(model_dirs, tmp_path):
    answers = chat_answers(model_dirs, tmp_path, "auto")
    text, tokens = answers["ruled"]
    assert text == generate_chat(model_dirs["ruled"], GenerationSettings())
    assert tokens == 10  # max_new_tokens, and min_new_tokens held every stop off
    # our own export has no such keys: it answers as plain greedy decoding does
    plain = generate_chat(model_dirs["plain"], GenerationSettings(max_new_tokens=10))
    assert answers["plain"][0].startswith(plain)

    asked = chat_answers({"ruled": model_dirs["ruled"]}, tmp_path, "auto", max_tokens=4)
    assert asked["ruled"][1] == 4  # the request's max_tokens, not the checkpoint's 10
    assert asked["ruled"][0] == generate_chat(
        model_dirs["ruled"], GenerationSettings(max_new_tokens=4)
    )


def test_none_answers_as_before(model_dirs, tmp_path):
    asked = {"max_tokens": 10}
    auto = chat_answers(model_dirs, tmp_path, "auto", **asked)
    none = chat_answers(model_dirs, tmp_path, "none", **asked)
    plain = GenerationSettings(max_new_tokens=10)
    assert none["ruled"][0] == generate_chat(model_dirs["ruled"], plain, defaults=False)
    assert none["ruled"][0] != auto["ruled"][0], "the checkpoint's rules should change the answer"
    assert none["plain"] == auto["plain"]  # our export: the same either way
    assert none["plain"][0] == generate_chat(model_dirs["plain"], plain)


def test_defaults_read_from_a_checkpoint(tmp_path, serve_model_dir):
    assert read_request_defaults(serve_model_dir, False) == NO_DEFAULTS  # our export
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "temperature": 0.7, "top_k": 20, "repetition_penalty": 1.2,
        "no_repeat_ngram_size": 3, "forced_eos_token_id": [2, 3], "max_new_tokens": 30,
    }))  # fmt: skip
    found = read_request_defaults(tmp_path, False)
    assert found == RequestDefaults(
        max_tokens=30, temperature=0.7, top_k=20, repetition_penalty=1.2,
        rules=LogitsRules(no_repeat_ngram_size=3, forced_eos_token_id=(2, 3)),
    )  # fmt: skip
    assert found.pick("temperature", 0.0, 1.0) == 0.0  # the request's own value wins
    assert found.pick("temperature", None, 1.0) == 0.7 and found.pick("top_p", None, 1.0) == 1.0
    # without do_sample, transformers never samples: its sampling keys are not defaults
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.7}))
    assert read_request_defaults(tmp_path, False) == NO_DEFAULTS
    # an encoder-decoder's max_length counts the decoder start
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_length": 20}))
    assert read_request_defaults(tmp_path, True).max_tokens == 19


def test_history_rules_change_only_the_rows_that_ask():
    def row(params: SamplingParams, history: list[int]) -> Row:
        r = Row(None, history, params, frozenset({0}))
        r.history = list(history) if params.sees_history else None
        return r

    logits = torch.zeros(3, 5)
    logits[:, 4] = 2.0
    rows = [
        row(SamplingParams(max_tokens=4), [4, 1]),
        row(SamplingParams(max_tokens=4, rules=LogitsRules(no_repeat_ngram_size=1)), [4, 1]),
        row(SamplingParams(max_tokens=4, repetition_penalty=2.0), [4, 1]),
    ]
    out = history_rules(rows, logits, RowBatch.build(rows, logits.device))
    assert torch.equal(out[0], logits[0])
    assert out[1, 4] == float("-inf") and out[1, 1] == float("-inf") and out[1, 2] == 0
    assert out[2, 4] == 1.0 and out[2, 0] == 0  # 2.0 / 2
    assert (
        history_rules(rows[:1], logits, RowBatch.build(rows[:1], logits.device)) is logits
    )  # nobody asks: no copy


def test_a_decoders_max_length_counts_the_prompt_as_in_lmforge_generate(model_dirs, tmp_path):
    """Without max_new_tokens, a decoder checkpoint's max_length (prompt included) bounds a
    request that sets no max_tokens, as `lmforge generate` and transformers bound it; a request's
    max_tokens wins; a prompt that leaves no room is a 400 naming max_tokens."""
    files = TokenizerFiles.load(model_dirs["plain"])
    prompt_len = len(files.encode(files.render_chat(QUESTION, add_generation_prompt=True)))
    # min_new_tokens holds every stop off, so the answer is exactly as long as its budget
    limited = tmp_path / "limited"
    shutil.copytree(model_dirs["plain"], limited)
    with_generation_config(limited, min_new_tokens=50, max_length=prompt_len + 6)
    assert read_request_defaults(limited, False).max_tokens_for(prompt_len) == 6

    text, tokens = chat_answers({"limited": limited}, tmp_path, "auto")["limited"]
    assert tokens == 6  # max_length - the prompt, not OpenAI's default nor the context's room
    assert text == generate_chat(limited, GenerationSettings())
    assert chat_answers({"limited": limited}, tmp_path, "auto", max_tokens=3)["limited"][1] == 3

    with_generation_config(limited, max_length=prompt_len)
    with pytest.raises(openai.BadRequestError, match="max_length") as err:
        chat_answers({"limited": limited}, tmp_path, "auto")
    assert err.value.body["param"] == "max_tokens"
