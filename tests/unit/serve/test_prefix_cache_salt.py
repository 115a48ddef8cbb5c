"""cache_salt (vLLM's): only requests with the same salt share prefix-cache blocks, so time to
first token cannot tell one client what another sent; answers are the same whatever the salt. In
the engine (hit counters) and through the app (a bad salt is a 400 naming the field)."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import InputError
from lmforge.model.config import preset_config
from lmforge.model.transformer import Transformer
from lmforge.serve.engine import Engine, SamplingParams, collect
from lmforge.serve.prefix_cache import BLOCK_TOKENS, TokenChain
from lmforge.tokenizer.files import TokenizerFiles

PROMPT = [(5 * i + 11) % 200 + 5 for i in range(3 * BLOCK_TOKENS + 4)]


@pytest.fixture(scope="module")
def engine(serve_model_dir):
    files = TokenizerFiles.load(serve_model_dir)
    torch.manual_seed(0)
    model = Transformer(preset_config("micro", vocab_size=files.vocab_size, init_std=0.2)).eval()
    eng = Engine(model, files, name="m", prefix_cache_mb=16, max_batch_size=4)
    eng.start()
    yield eng
    eng.shutdown(drain=False)


def _ask(engine: Engine, salt: str | None, tag: str) -> tuple[list[int], int, int]:
    """The greedy answer to PROMPT under `salt`, and the hits and hit tokens its lookup added."""
    before = engine.stats().prefix
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, cache_salt=salt)
    answer = collect(engine.submit(PROMPT, params, tag)).token_ids
    after = engine.stats().prefix
    return answer, after.hits - before.hits, after.hit_tokens - before.hit_tokens


def test_only_requests_with_the_same_salt_share_blocks(engine):
    reused = 3 * BLOCK_TOKENS  # the prompt's whole blocks, its last token left to the model
    first, hits, _ = _ask(engine, "alice", "a1")
    assert hits == 0
    again, hits, tokens = _ask(engine, "alice", "a2")
    assert (hits, tokens) == (1, reused)
    other, hits, _ = _ask(engine, "bob", "b1")  # another salt: nothing of alice's
    assert hits == 0
    unsalted, hits, _ = _ask(engine, None, "n1")  # no salt: nothing of any salted request's
    assert hits == 0
    unsalted2, hits, tokens = _ask(engine, None, "n2")  # unsalted requests share among themselves
    assert (hits, tokens) == (1, reused)
    bob2, hits, tokens = _ask(engine, "bob", "b2")
    assert (hits, tokens) == (1, reused)
    assert first == again == other == unsalted == unsalted2 == bob2


def test_a_salt_changes_every_block_key_and_only_the_salt_does():
    tokens = list(range(2 * BLOCK_TOKENS))
    plain, same = TokenChain(tokens).keys(2), TokenChain(tokens).keys(2)
    a, a2, b = (TokenChain(tokens, salt=s).keys(2) for s in ("a", "a", "b"))
    assert plain == same and a == a2
    assert not {*plain} & {*a} and not {*a} & {*b}  # the first block's and every later one


@pytest.mark.parametrize("salt", [5, "", ["x"]])
def test_sampling_params_refuse_a_salt_that_is_not_a_non_empty_string(salt):
    with pytest.raises(InputError, match="cache_salt must be None or a non-empty string"):
        SamplingParams(cache_salt=salt).validate()


TEXT = "the same long question, " * 3  # whole blocks of tokens, within the 128 of context
ROUTES = {
    "completions": {"prompt": TEXT},
    "chat/completions": {"messages": [{"role": "user", "content": TEXT}]},
}


@pytest.mark.parametrize("route", ROUTES)
def test_a_bad_salt_is_a_400_naming_the_field_and_a_good_one_answers_the_same(
    serve_model_dir, tmp_path, route
):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from lmforge.serve.server import create_app
    from lmforge.serve.settings import ServeSettings

    settings = ServeSettings(
        models=[{"name": "m", "path": serve_model_dir}], feedback_db=tmp_path / "f.db"
    )
    body = {"model": "m", "max_tokens": 4, "temperature": 0, "ignore_eos": True, **ROUTES[route]}
    app = create_app(settings)
    with TestClient(app) as client:
        prefix = app.state.serve.engines["m"].stats  # the salt reaches the engine's rows
        plain, salted, *bad = (
            client.post(f"/v1/{route}", json={**body, **extra})
            for extra in ({}, {"cache_salt": "tenant-1"}, *({"cache_salt": s} for s in (5, "", {})))
        )
        assert (prefix().prefix.hits, prefix().prefix.misses) == (0, 2)  # salted: plain's unused
        again = {**body, "cache_salt": "tenant-1", "max_tokens": 3}  # not the response cache's
        assert client.post(f"/v1/{route}", json=again).status_code == 200
        assert prefix().prefix.hits == 1
    assert plain.status_code == salted.status_code == 200
    assert plain.json()["choices"] == salted.json()["choices"]
    for r in bad:
        error = r.json()["error"]
        assert (r.status_code, error["param"]) == (400, "cache_salt"), r.text
        assert "cache_salt" in error["message"]


def test_the_response_cache_keys_on_the_salt_too():
    """A response cache hit would tell as much as a prefix cache hit: salts keep apart there too."""
    from lmforge.serve.cache import cache_key

    keys = {cache_key("m", [1, 2], SamplingParams(temperature=0, cache_salt=s)) for s in "ab"}
    keys.add(cache_key("m", [1, 2], SamplingParams(temperature=0)))
    assert len(keys) == 3
