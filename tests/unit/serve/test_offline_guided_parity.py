"""Structured outputs offline (`lmforge generate --json-schema/--regex/--choice`,
tests/unit/evals/test_generate_constrained.py) and served follow the same rules: greedy guided
answers of EvalModel.generate_batch are the serving engine's for the same prompt, plain or
rendered with the chat template (--chat)."""

from __future__ import annotations

import pytest

from lmforge.constrain import compiler_for
from lmforge.evals.lm import EvalModel, GenerationSettings
from unit.evals.test_generate_constrained import PROMPTS, SCHEMA


@pytest.fixture(scope="module")
def lm(serve_model_dir) -> EvalModel:
    return EvalModel.load(serve_model_dir)


def test_greedy_guided_answers_are_the_serving_engines(engine, lm):
    from lmforge.serve.handle import collect
    from lmforge.serve.sampling import SamplingParams

    asked = {
        "json_schema": SCHEMA,
        "regex": r"[a-z ]{3,12}\.",
        "choice": ["zq", "zzq", "hello"],
    }
    compiler = compiler_for(engine.files)
    for kind, value in asked.items():
        settings = GenerationSettings(max_new_tokens=70, **{kind: value})
        offline = lm.generate_batch(PROMPTS, settings)
        guide = compiler.compile(*settings.output_constraint())
        params = SamplingParams(max_tokens=70, temperature=0, guide=guide)
        served = [
            collect(engine.submit(lm.start(p), params, f"{kind}-{i}"))
            for i, p in enumerate(PROMPTS)
        ]
        assert [s.finish_reason for s in served] == ["stop"] * len(PROMPTS)
        assert offline == [s.text for s in served], kind


def test_greedy_guided_chat_answers_are_the_serving_engines(engine, lm):
    """--chat: the prompt rendered with the chat template, the answer ended by its end of turn
    (generation_config's eos) once the grammar may end, as the engine ends a chat answer."""
    from lmforge.serve.handle import collect
    from lmforge.serve.sampling import SamplingParams

    settings = GenerationSettings(max_new_tokens=40, regex=r"[a-z ]{3,20}\.?")
    offline = lm.generate_batch(PROMPTS, settings, chat=True)
    guide = compiler_for(engine.files).compile(*settings.output_constraint())
    params = SamplingParams(max_tokens=40, temperature=0, guide=guide)
    served = [
        collect(engine.submit(lm.encode(lm.render_chat(p)), params, f"chat-{i}"))
        for i, p in enumerate(PROMPTS)
    ]
    assert offline == [s.text for s in served]
    assert [s.finish_reason for s in served] == ["stop"] * len(PROMPTS)
