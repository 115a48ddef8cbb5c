"""The prefix cache keeps answers: a chat's next turn (prompt + answer + a new user turn) reuses
the previous answer's blocks, its answers unchanged: in the engine (greedy and seeded, n > 1, rows
of different lengths leaving the batch at different steps, an abort, the byte budget) and through
a real server with the openai client and a chat template; and each row's block keys are hashed
once. The prompt-only cache: test_serve_prefix_cache.py."""

from __future__ import annotations

import pytest
import torch

from lmforge.model.config import preset_config
from lmforge.model.transformer import Transformer
from lmforge.serve import prefix_cache
from lmforge.serve.engine import Engine, SamplingParams, collect
from lmforge.serve.prefix_cache import BLOCK_TOKENS, PrefixCache, TokenChain
from lmforge.tokenizer.files import TokenizerFiles

B = BLOCK_TOKENS


@pytest.fixture(scope="module")
def files(serve_model_dir) -> TokenizerFiles:
    return TokenizerFiles.load(serve_model_dir)


@pytest.fixture(scope="module")
def model(files) -> Transformer:
    torch.manual_seed(0)
    config = preset_config("micro", vocab_size=files.vocab_size, init_std=0.2)
    return Transformer(config).eval()


def _prompt(seed: int, n: int) -> list[int]:
    return [(7 * i + 13 * seed + 3) % 200 + 5 for i in range(n)]


# turn-1 prompts of different lengths (rows left-padded differently) and answer lengths (rows
# leaving the batch at different steps, so the survivors' cache rows are reordered and trimmed)
CHATS = [(_prompt(0, 2 * B + 5), 2 * B + 3), (_prompt(1, B - 3), 3 * B), (_prompt(2, B + 9), 9)]
GREEDY = {"temperature": 0, "ignore_eos": True, "logprobs": 0}
SEEDED = {"temperature": 1.0, "seed": 5, "ignore_eos": True, "logprobs": 0}


def _stored_answer_tokens(prompt: list[int], answer: list[int], turn2: list[int]) -> int:
    """Positions turn 2's lookup covers: the whole blocks of prompt + answer less its last token
    (never fed back, so not in the cache), within turn 2's reusable blocks."""
    return min((len(prompt) + len(answer) - 1) // B, (len(turn2) - 1) // B) * B


def _two_turns(model, files, mb: float, sampling: dict, n: int = 1):
    """Turn 1 of every chat at once (n answers each: rows sharing a prompt), then each turn 2
    alone: ((turn-1 answers, turn-2 tokens and logprobs), the prefix tokens each turn 2 reused)."""
    engine = Engine(model, files, name="m", prefix_cache_mb=mb, max_batch_size=8)
    engine.start()
    try:
        handles = [
            engine.submit(prompt, SamplingParams(max_tokens=m, **_seeded(sampling, j)), f"{c}-{j}")
            for c, (prompt, m) in enumerate(CHATS)
            for j in range(n)
        ]
        firsts = [collect(h).token_ids for h in handles]
        turns, reused = [], []
        for i, answer in enumerate(firsts):
            prompt = CHATS[i // n][0]
            turn2 = [*prompt, *answer, 30, 31, 32, *_prompt(9, i + 3)]
            before = engine.stats().prefix.hit_tokens
            c = collect(engine.submit(turn2, SamplingParams(max_tokens=6, **sampling), f"t2-{i}"))
            reused.append(engine.stats().prefix.hit_tokens - before)
            turns.append((answer, c.token_ids, c.logprobs))
            want = _stored_answer_tokens(prompt, answer, turn2)
            assert not mb or reused[-1] == want, (i, reused[-1], want)
        return turns, reused
    finally:
        engine.shutdown(drain=False)


def _seeded(sampling: dict, j: int) -> dict:
    """The j-th of n answers to one prompt: its own seed, when sampling."""
    return {**sampling, "seed": sampling["seed"] + j} if "seed" in sampling else sampling


def _assert_same(off, on) -> None:
    for a, b in zip(off, on, strict=True):
        assert a[:2] == b[:2]  # the same answers, both turns
        assert a[2] == pytest.approx(b[2], abs=1e-4)  # logprobs up to float reassociation


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_second_turn_reuses_the_first_turns_answer_and_answers_the_same(model, files, sampling):
    off, none = _two_turns(model, files, 0, sampling)
    on, reused = _two_turns(model, files, 4, sampling)
    _assert_same(off, on)
    assert none == [0, 0, 0]
    for (prompt, _), r in zip(CHATS, reused, strict=True):
        assert r > len(prompt) // B * B  # more than turn 1's prompt blocks: its answer too
    assert len({tuple(t[1]) for t in off}) > 1  # the model is not degenerate


def test_rows_sharing_a_prompt_each_keep_their_own_answer(model, files):
    off, _ = _two_turns(model, files, 0, SEEDED, n=2)
    on, reused = _two_turns(model, files, 4, SEEDED, n=2)
    _assert_same(off, on)
    assert on[0][0] != on[1][0]  # n = 2: two different answers to one prompt...
    assert reused[0] == reused[1] > len(CHATS[0][0]) // B * B  # ...each found in full


def test_an_aborted_answer_is_kept_up_to_its_last_fed_token(model, files, monkeypatch):
    import time

    import lmforge.serve.step_loop as step_loop_module

    real = step_loop_module.decode_pass

    def slow(*args):  # 10 ms a step: the abort lands long before max_tokens
        time.sleep(0.01)
        return real(*args)

    monkeypatch.setattr(step_loop_module, "decode_pass", slow)
    engine = Engine(model, files, name="m", prefix_cache_mb=4)
    engine.start()
    try:
        prompt = _prompt(3, B + 2)
        handle = engine.submit(prompt, SamplingParams(max_tokens=100, **GREEDY), "long")
        answer = []  # every token it sent, however many after the abort was asked
        for event in handle:
            if event.finish_reason == "abort":
                break
            answer.append(event.token_id)
            if len(answer) == 2 * B:
                engine.abort("long")
        assert handle.finish_reason == "abort"
        assert 2 * B <= len(answer) < 100
        turn2 = [*prompt, *answer, 40, 41]
        before = engine.stats().prefix.hit_tokens
        collect(engine.submit(turn2, SamplingParams(max_tokens=2, **GREEDY), "next"))
        reused = engine.stats().prefix.hit_tokens - before
        assert reused == _stored_answer_tokens(prompt, answer, turn2)
    finally:
        engine.shutdown(drain=False)


def test_answer_blocks_are_ordinary_blocks_under_the_budget(model, files):
    """A budget of four blocks: a long answer's chain fills it, and the next prompt's store
    evicts the answer's deepest (least recently used) blocks first."""
    cfg = model.config
    block = 2 * cfg.n_layer * cfg.n_kv_head * B * cfg.hd * 4  # one block's fp32 keys/values
    engine = Engine(model, files, name="m", prefix_cache_mb=4 * block / 2**20)
    engine.start()
    try:
        prompt = _prompt(4, B + 1)
        answer = collect(engine.submit(prompt, SamplingParams(max_tokens=4 * B, **GREEDY), "a"))
        stats = engine.stats().prefix
        # 5 whole blocks fed: the first 4 kept (its own chain is never evicted to store it)
        assert (stats.blocks, stats.bytes, stats.evictions) == (4, 4 * block, 0)
        collect(engine.submit(_prompt(5, 2 * B + 1), SamplingParams(max_tokens=1), "b"))
        assert engine.stats().prefix.evictions == 2  # two of a's, the deepest first
        turn2 = [*prompt, *answer.token_ids]
        assert engine._prefix.peek(turn2) == 2 * B  # a's first two blocks are left
    finally:
        engine.shutdown(drain=False)


# -- each block hashed once ----------------------------------------------------------------------


@pytest.fixture
def hashes(monkeypatch) -> list[bytes]:
    """Every block key computed from now on (prefix_cache.block_key wrapped)."""
    made: list[bytes] = []
    real = prefix_cache.block_key

    def counted(parent: bytes, tokens) -> bytes:
        made.append(real(parent, tokens))
        return made[-1]

    monkeypatch.setattr(prefix_cache, "block_key", counted)
    return made


def test_a_chain_hashes_each_block_once_as_it_grows(hashes):
    chain = TokenChain(range(2 * B + 3))
    assert chain.keys(1) == chain.keys(1) and len(hashes) == 1
    assert len(chain.keys(2)) == 2 and len(hashes) == 2
    for token in range(B):
        chain.append(token)
    assert chain.keys(3)[:2] == hashes[:2] and len(hashes) == 3
    assert chain.keys(3) == PrefixCache(1).keys(list(chain.tokens), 3)  # a list: hashed afresh
    assert len(hashes) == 6


@pytest.mark.parametrize("mb", [0, 4])
def test_the_engine_hashes_each_rows_blocks_once(model, files, hashes, mb):
    """A burst over one new prefix (so all but the first wait a step, admission asking again),
    a chunked prefill, and answers stored at their end: every row's whole blocks of prompt and
    fed answer, each hashed once; none with the cache off."""
    engine = Engine(model, files, name="m", prefix_cache_mb=mb, max_prefill_tokens=3 * B)
    shared = _prompt(6, 2 * B)
    prompts = [[*shared, i, i + 1] for i in range(3)] + [_prompt(7, 4 * B + 3)]  # last: chunked
    new = [5, B + 1, 2 * B, 7]
    handles = [
        engine.submit(p, SamplingParams(max_tokens=m, **GREEDY), f"r{i}")
        for i, (p, m) in enumerate(zip(prompts, new, strict=True))
    ]
    engine.start()
    try:
        for handle in handles:
            collect(handle)
    finally:
        engine.shutdown(drain=False)
    want = sum((len(p) + m - 1) // B for p, m in zip(prompts, new, strict=True)) if mb else 0
    assert len(hashes) == want
    assert not mb or engine.stats().prefix.hits >= 2  # the burst's later rows did reuse


# -- through a real server: a chat's second turn -------------------------------------------------


ANSWER = "Paris is the capital of the capital"  # its canonical tokens: none a prefix of another


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 3}])
def test_a_servers_second_chat_turn_reuses_the_first_answer(
    serve_model_dir, files, tmp_path, sampling
):
    """The random test model's own answers are not valid text, so they would not survive the
    round trip through the client; turn 1 is steered to ANSWER in its canonical tokens (a
    guided choice, the canonical tokens favoured by logit_bias), as a trained model's answer
    would be, and comes back as the assistant message of turn 2."""
    from unit.serve.test_serve_prefix_cache import _metric, served

    canonical = files.tokenizer.encode(ANSWER).ids
    steer = {
        "logit_bias": {str(t): 50 for t in canonical},
        "extra_body": {"guided_choice": [ANSWER]},
    }
    first = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": "Capital of France?"}]  # fmt: skip
    second = [*first, {"role": "assistant", "content": ANSWER},
              {"role": "user", "content": "Italy?"}]  # fmt: skip
    hit = 'lmforge_prefix_cache_hit_tokens_total{model="m"}'
    runs = {}
    for mb in (0, 2):
        with served(serve_model_dir, tmp_path, mb) as (url, client):
            one = client.chat.completions.create(
                model="m", messages=first, max_tokens=len(canonical) + 4, **sampling, **steer
            )
            before = _metric(url, hit)
            two = client.chat.completions.create(
                model="m", messages=second, max_tokens=4, logprobs=True, **sampling
            )
            runs[mb] = (one, two, _metric(url, hit) - before)
    (one, two_off, none), (_, two_on, reused) = runs[0], runs[2]
    assert one.choices[0].message.content == ANSWER
    assert one.usage.completion_tokens == len(canonical)  # its canonical tokens, no more
    assert two_off.choices[0].message.content == two_on.choices[0].message.content
    got = [t.logprob for t in two_on.choices[0].logprobs.content]
    assert got == pytest.approx([t.logprob for t in two_off.choices[0].logprobs.content], abs=1e-4)
    fed = one.usage.prompt_tokens + len(canonical) - 1  # the last answer token was never fed
    assert none == 0
    assert reused == fed // B * B > one.usage.prompt_tokens // B * B  # the answer's blocks too
