"""The per-batch state kept across decoding steps (serve/row_batch.py) gives exactly what
rebuilding it from each row's history every step gave, as rows join and leave at any step."""

from __future__ import annotations

import random

import pytest
import torch

from lmforge.model.generate import apply_repetition_penalty, generate
from lmforge.model.logits_rules import LogitsRules
from lmforge.serve.emit import history_rules
from lmforge.serve.engine import Engine, collect
from lmforge.serve.prefix_cache import BLOCK_TOKENS
from lmforge.serve.request_book import Row
from lmforge.serve.row_batch import MIN_COLUMNS, RowBatch, TokenTable
from lmforge.serve.sampling import SamplingParams, apply_logit_bias, logit_bias_of

V = 50
KINDS = [
    SamplingParams(max_tokens=90),  # neither: left as it is
    SamplingParams(max_tokens=90, repetition_penalty=1.3),
    SamplingParams(max_tokens=90, rules=LogitsRules(no_repeat_ngram_size=2, min_new_tokens=5)),
    SamplingParams(
        max_tokens=90, repetition_penalty=0.7, rules=LogitsRules(no_repeat_ngram_size=3)
    ),
    SamplingParams(max_tokens=90, logit_bias=((3, 2.0), (7, -100.0))),
]


def new_row(params: SamplingParams, history: list[int]) -> Row:
    row = Row(None, history, params, frozenset({0, 9}))
    row.history = list(history) if params.sees_history else None
    return row


def rebuilt_each_step(rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
    """What history_rules did before its state was kept: every row from its history list."""
    out = logits.float().clone()
    for i, row in enumerate(rows):
        p = row.params
        if row.history is None or not p.sees_history:
            continue
        history = torch.tensor([row.history], dtype=torch.long)
        one = p.rules.apply(out[i : i + 1], history, None, row.generated, 90, sorted(row.stops))
        if p.repetition_penalty != 1.0:
            one = apply_repetition_penalty(one, history, p.repetition_penalty)
        out[i] = one[0]
    return out


def step(rows: list[Row], rng: random.Random) -> RowBatch:
    """One decoding step: the kept state's logits against the rebuilt ones', then a token each."""
    logits = torch.randn(len(rows), V) * 3
    batch = RowBatch.of(rows, logits.device)
    assert torch.equal(history_rules(rows, logits, batch), rebuilt_each_step(rows, logits))
    params = [r.params for r in rows]
    assert torch.equal(
        apply_logit_bias(logits, batch.bias),
        apply_logit_bias(logits, logit_bias_of(params, logits.device)),
    )
    tokens = [rng.choice([rng.randrange(V), 5]) for _ in rows]  # repeats, as models do
    batch.append(tokens)
    for row, token in zip(rows, tokens, strict=True):
        row.generated += 1
        if row.history is not None:
            row.history.append(token)
    return batch


def test_kept_state_equals_the_rebuilt_one_as_rows_join_and_leave():
    """As in the engine: a newcomer's first token is drawn alone (its prefill), then it joins
    the running batch anywhere; rows leave from anywhere."""
    rng = random.Random(0)
    torch.manual_seed(0)
    rows: list[Row] = []
    last, kept, changes = None, 0, 0
    for _ in range(120):
        if rng.random() < 0.15 or not rows:  # newcomers join
            for _ in range(rng.choice([1, 1, 2])):
                length = rng.choice([0, 1, 3, 40]) if rng.random() < 0.5 else 1
                row = new_row(rng.choice(KINDS), [rng.randrange(V) for _ in range(length)])
                step([row], rng)
                rows.insert(rng.randrange(len(rows) + 1), row)
        if rng.random() < 0.08 and len(rows) > 1:  # one leaves
            rows.pop(rng.randrange(len(rows)))
        joined_or_left = last is None or last.rows != rows
        batch = step(rows, rng)
        kept += batch is last  # the same RowBatch object, not a rebuilt one
        changes += joined_or_left
        assert (batch is last) == (not joined_or_left)  # kept exactly while the rows stay
        last = batch
    assert kept > 60 and changes > 10
    assert max(len(r.history or ()) for r in rows) > 64  # past TokenTable's first columns


def test_a_penalized_row_with_no_history_is_penalized_from_its_first_token():
    row = new_row(SamplingParams(repetition_penalty=2.0), [])
    logits = torch.tensor([[2.0, -2.0, 4.0]])
    batch = RowBatch.build([row], logits.device)
    assert torch.equal(history_rules([row], logits, batch), logits)
    batch.append([2])
    assert history_rules([row], logits, batch).tolist() == [[2.0, -2.0, 2.0]]
    batch.append([1])
    assert history_rules([row], logits, batch).tolist() == [[2.0, -4.0, 2.0]]


def test_a_token_table_grows_and_keeps_each_rows_tokens():
    table = TokenTable.from_lists([[1, 2], []], [1, 0], torch.device("cpu"))
    for t in range(100):
        table.append([(0, t), (1, t + 1)] if t % 3 else [(0, t)])
    assert table.row(0).tolist() == [[1, 2, *range(100)]]
    assert table.row(1).tolist() == [[t + 1 for t in range(100) if t % 3]]
    assert table.ids.size(1) >= 102 and set(table.ids[0, 102:].tolist()) <= {1}


def test_rows_with_and_without_rules_joining_and_leaving_get_their_answers_alone(engine):
    """Seeded rows with and without penalties, rules and biases, of different lengths, joining
    a batch already decoding: each row's tokens are those it gets alone."""
    prompt = engine.files.encode("The history of the river and its towns")
    asks = [
        SamplingParams(max_tokens=6 + 3 * i, seed=i, ignore_eos=True, **extra)
        for i, extra in enumerate(
            [
                {},
                dict(repetition_penalty=1.5),
                dict(rules=LogitsRules(no_repeat_ngram_size=2), logit_bias=((5, 3.0),)),
                dict(repetition_penalty=0.8, rules=LogitsRules(min_new_tokens=4)),
                dict(logit_bias=((5, -100.0), (6, 1.5))),
                dict(repetition_penalty=1.2, temperature=0),
            ]
        )
    ]
    handles = []
    for i, params in enumerate(asks):
        handles.append(engine.submit(prompt[: 3 + i], params, f"join-{i}"))
        if i in (0, 2):  # the next rows join a batch already decoding
            next(iter(handles[-1]))
    batched = [collect(h).token_ids for h in handles]
    alone = [
        collect(engine.submit(prompt[: 3 + i], p, f"alone-{i}")).token_ids
        for i, p in enumerate(asks)
    ]
    assert [len(a) for a in alone] == [p.max_tokens for p in asks]
    assert batched[0] == alone[0][1:] and batched[2] == alone[2][1:]  # less the read token
    assert [b for i, b in enumerate(batched) if i not in (0, 2)] == [
        a for i, a in enumerate(alone) if i not in (0, 2)
    ]


def test_a_long_row_leaving_takes_its_columns_with_it():
    """A regrouped batch's tables are as wide as its own rows need, not as the widest batch
    they came from (else a server's tables keep every departed long answer's width)."""
    params = SamplingParams(
        max_tokens=90, repetition_penalty=1.3, rules=LogitsRules(no_repeat_ngram_size=2)
    )
    long, short = new_row(params, list(range(300))), new_row(params, [4, 1, 4])
    assert RowBatch.build([long, short], torch.device("cpu")).seen.table.ids.size(1) >= 300
    rng = random.Random(1)
    for _ in range(3):  # regrouped once, then kept: still what the rows' histories give
        batch = step([short], rng)
    assert batch.history.ids.size(1) == MIN_COLUMNS
    assert batch.seen.table.ids.size(1) == MIN_COLUMNS


def test_logprobs_stay_the_raw_models_under_the_n_gram_ban(engine):
    """The no-repeat n-gram ban writes in place into the logits it is handed: the row must get
    the step's ruled copy, and its logprobs the raw model's (the banned token's among them)."""
    files = engine.files
    prompt = files.encode("The river")
    for _ in range(20):  # a prompt whose raw next token repeats one of its own
        with torch.inference_mode():
            raw = torch.log_softmax(engine.model(torch.tensor([prompt]))[0, -1].float(), dim=-1)
        if int(raw.argmax()) in prompt:
            break
        prompt = [*prompt, int(raw.argmax())]
    assert int(raw.argmax()) in prompt
    params = SamplingParams(
        max_tokens=2, temperature=0, logprobs=2, ignore_eos=True,
        repetition_penalty=1.5, rules=LogitsRules(no_repeat_ngram_size=1),
    )  # fmt: skip
    first = next(iter(engine.submit(prompt, params, "ngram-lp")))
    assert first.token_id not in prompt  # the ban held: not the raw argmax
    assert first.logprob == pytest.approx(raw[first.token_id].item(), abs=1e-4)
    assert max(first.top_logprobs.values()) == pytest.approx(raw.max().item(), abs=1e-4)


def test_history_rules_leave_the_models_logits_as_they_are():
    rows = [new_row(kind, [3, 5, 3, 7, 5]) for kind in KINDS]
    logits = torch.randn(len(rows), V)
    before = logits.clone()
    out = history_rules(rows, logits, RowBatch.build(rows, logits.device))
    assert torch.equal(logits, before)
    assert out.isinf().any()  # the n-gram rows' bans landed in the copy


def test_a_prompt_from_the_prefix_cache_is_all_in_the_rules_history(engine):
    """A prompt whose leading blocks the prefix cache supplies still counts them all in the
    penalty's and the rules' history: its answers, computed or from the cache, are generate()'s
    on the whole prompt, and a 1-gram ban keeps out a cached token the model would repeat."""
    plain = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    for step in range(1, 40):  # a prompt whose plain answer repeats a token of its first blocks
        prompt = [(step * i + 3) % 200 + 5 for i in range(2 * BLOCK_TOKENS + 5)]
        repeated = set(collect(engine.submit(prompt, plain, f"p{step}")).token_ids)
        if repeated & set(prompt[: 2 * BLOCK_TOKENS]):
            break
    assert repeated & set(prompt[: 2 * BLOCK_TOKENS])
    rules = LogitsRules(no_repeat_ngram_size=1)
    params = SamplingParams(
        max_tokens=8, temperature=0, ignore_eos=True, repetition_penalty=1.3, rules=rules
    )
    cached = Engine(engine.model, engine.files, name="pc", prefix_cache_mb=4)
    cached.start()
    try:
        answers = [collect(cached.submit(prompt, params, f"pc{r}")).token_ids for r in range(2)]
        assert cached.stats().prefix.hits >= 1  # the second answer's prompt came from the cache
    finally:
        cached.shutdown(drain=False)
    with torch.inference_mode():
        want = generate(engine.model, torch.tensor([prompt]), 8, greedy=True,
                        repetition_penalty=1.3, rules=rules)[0, len(prompt):].tolist()  # fmt: skip
    assert answers[0] == answers[1] == want
    assert not set(want) & set(prompt)
