"""OpenAI's logit_bias and vLLM's min_tokens: +100 forces a token and -100 bans it under greedy
decoding, logprobs stay the raw model's, min_tokens holds off the stop tokens (and overrides a
checkpoint's min_new_tokens), bad values are 400s naming the field, and in a batch each row gets
the answer it gets alone. Real uvicorn on 127.0.0.1, read by the openai client; the batch on the
engine itself, where the rows are known to share steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("fastapi")
pytest.importorskip("openai")

import openai

from lmforge.model.convert import load_pretrained
from lmforge.model.generate import generate
from lmforge.serve.engine import collect
from lmforge.serve.launch import free_port
from lmforge.serve.sampling import SamplingParams
from lmforge.serve.server import create_app
from lmforge.serve.settings import ServeSettings
from lmforge.tokenizer.files import TokenizerFiles
from unit.finetune.helpers import make_model_dir, make_tokenizer_dir
from unit.serve.test_generation_config import with_generation_config
from unit.serve.test_serve_uvicorn import running

PROMPT = "Hello there"
CHECKPOINT_MIN_NEW = 6  # the "ruled" checkpoint's min_new_tokens


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(client, files, model) with a server for "m" (a micro chat model as we export it) and
    "ruled" (the same with a generation_config asking min_new_tokens)."""
    tmp = tmp_path_factory.mktemp("bias")
    tok = make_tokenizer_dir(tmp / "tok")
    plain = make_model_dir(tmp / "plain", tok, init_std=0.2)
    ruled = with_generation_config(
        make_model_dir(tmp / "ruled", tok, init_std=0.2), min_new_tokens=CHECKPOINT_MIN_NEW
    )
    settings = ServeSettings(
        models=[{"name": "m", "path": plain}, {"name": "ruled", "path": ruled}],
        feedback_db=tmp / "f.db", port=free_port(),
    )  # fmt: skip
    with running(settings, create_app(settings)):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{settings.port}/v1", api_key="-")
        yield client, TokenizerFiles.load(plain), load_pretrained(plain)


def greedy_ids(model, prompt: list[int], n: int) -> list[int]:
    out = generate(model, torch.tensor([prompt]), n, greedy=True)
    return out[0, len(prompt) :].tolist()


def complete(client, **ask):
    return client.completions.create(model="m", prompt=PROMPT, temperature=0, **ask)


def test_a_bias_of_100_forces_a_token_and_logprobs_stay_raw(served):
    client, files, model = served
    prompt = files.encode(PROMPT)
    first = greedy_ids(model, prompt, 1)[0]
    forced = next(t for t in files.encode(" world of paths") if t != first)
    plain = complete(client, max_tokens=3, logprobs=5)
    biased = complete(client, max_tokens=3, logprobs=5, logit_bias={str(forced): 100})
    assert biased.choices[0].text == files.decode([forced] * 3)
    assert biased.usage.completion_tokens == 3
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([prompt]))[0, -1].float(), dim=-1)
    lp = biased.choices[0].logprobs
    assert lp.token_logprobs[0] == pytest.approx(logp[forced].item(), abs=1e-4)
    assert lp.token_logprobs[0] < -0.5  # the raw model's, not the biased distribution's ~0
    assert lp.top_logprobs[0] == pytest.approx(plain.choices[0].logprobs.top_logprobs[0])


def test_a_bias_of_minus_100_bans_the_greedy_token_on_both_endpoints(served):
    client, files, model = served
    answer = greedy_ids(model, files.encode(PROMPT), 8)
    banned = max(set(answer), key=answer.count)
    no_eos = {"ignore_eos": True}
    plain = complete(client, max_tokens=8, extra_body=no_eos)
    biased = complete(client, max_tokens=8, extra_body=no_eos, logprobs=0,
                      logit_bias={str(banned): -100})  # fmt: skip
    assert plain.choices[0].text == files.decode(answer)
    assert biased.choices[0].text != plain.choices[0].text
    assert files.decode([banned]) not in biased.choices[0].logprobs.tokens
    assert biased.usage.completion_tokens == 8

    messages = [{"role": "user", "content": PROMPT}]
    chat = dict(model="m", messages=messages, temperature=0, max_tokens=8, logprobs=True)
    first = client.chat.completions.create(**chat).choices[0].logprobs.content[0].token
    spelled = [t for t in range(files.vocab_size) if files.decode([t], False) == first]
    rebiased = client.chat.completions.create(**chat, logit_bias={str(t): -100 for t in spelled})
    assert first not in [c.token for c in rebiased.choices[0].logprobs.content]


def test_min_tokens_keeps_a_model_that_would_stop_at_once_going(served):
    client, files, _ = served
    eos = str(files.tokenizer.token_to_id("<|im_end|>"))
    stop_now = {eos: 100}  # greedy stops at its first token
    at_once = complete(client, max_tokens=16, logit_bias=stop_now)
    assert (at_once.choices[0].text, at_once.choices[0].finish_reason) == ("", "stop")
    held = complete(client, max_tokens=16, logit_bias=stop_now, extra_body={"min_tokens": 5})
    assert held.choices[0].finish_reason == "stop"
    assert held.usage.completion_tokens == at_once.usage.completion_tokens + 5
    assert held.choices[0].text

    # a request's min_tokens overrides the checkpoint's min_new_tokens, both ways
    def ruled(**ask) -> int:
        r = client.completions.create(
            model="ruled", prompt=PROMPT, temperature=0, max_tokens=16, logit_bias=stop_now, **ask
        )
        return r.usage.completion_tokens - at_once.usage.completion_tokens

    assert ruled() == CHECKPOINT_MIN_NEW
    assert ruled(extra_body={"min_tokens": 2}) == 2
    assert ruled(extra_body={"min_tokens": 0}) == 0


@pytest.mark.parametrize(
    ("ask", "param", "says"),
    [
        ({"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
        ({"logit_bias": {"-3": 1}}, "logit_bias", "token ids"),
        ({"logit_bias": {"5": 100.5}}, "logit_bias", "[-100, 100]"),
        ({"logit_bias": {"5": -101}}, "logit_bias", "[-100, 100]"),
        ({"logit_bias": {"5": "lots"}}, "logit_bias.5", "number"),
        ({"logit_bias": {"5": 1, "05": 1}}, "logit_bias", "each token id once"),
        ({"logit_bias": {"99999": 1}}, "logit_bias", "outside the model's vocabulary"),
        ({"min_tokens": -1}, "min_tokens", "greater than or equal to 0"),
        ({"min_tokens": 9, "max_tokens": 8}, "min_tokens", "more than max_tokens=8"),
    ],
)
def test_bad_values_are_400s_naming_the_field(served, ask, param, says):
    client = served[0]
    for create, body in (
        (client.completions.create, {"prompt": PROMPT}),
        (client.chat.completions.create, {"messages": [{"role": "user", "content": PROMPT}]}),
    ):
        with pytest.raises(openai.BadRequestError) as exc:
            create(model="m", max_tokens=ask.get("max_tokens", 4), extra_body=ask, **body)
        error = exc.value.response.json()["error"]
        assert error["param"] == param
        assert says in error["message"]


def test_a_batch_with_and_without_bias_gives_each_row_its_answer_alone(engine):
    prompt = engine.files.encode("What is the capital of France?")
    answer = generate(engine.model, torch.tensor([prompt]), 12, greedy=True)[0, len(prompt) :]
    banned, lifted = answer[0].item(), answer[-1].item()
    asks = [
        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logit_bias=((banned, -100),)),
        SamplingParams(max_tokens=12, seed=3, ignore_eos=True, logit_bias=((lifted, 4.0),)),
        SamplingParams(max_tokens=12, seed=3, ignore_eos=True),
    ]
    handles = []
    for i, params in enumerate(asks):
        handles.append(engine.submit(prompt, params, f"batch-{i}"))
        if i == 0:  # the others join a batch already decoding
            next(iter(handles[0]))
    batched = [collect(h).token_ids for h in handles]  # the first without its first token
    alone = [collect(engine.submit(prompt, p, f"alone-{i}")).token_ids for i, p in enumerate(asks)]
    assert batched == [alone[0][1:], *alone[1:]]
    assert alone[0] == answer.tolist()
    assert banned not in alone[1] and alone[1] != alone[0]
    assert alone[2].count(lifted) > alone[3].count(lifted)  # +4 on one token shows
