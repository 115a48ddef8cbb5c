"""Seq2SeqEngine: continuous batching of an encoder-decoder gives generate_seq2seq's tokens."""

from __future__ import annotations

import time

import pytest
import torch

from lmforge.errors import InputError
from lmforge.model.logits_rules import LogitsRules
from lmforge.model.seq2seq_generate import generate_seq2seq_batched, source_row
from lmforge.serve.engine import Engine
from lmforge.serve.handle import collect
from lmforge.serve.sampling import SamplingParams
from lmforge.serve.seq2seq_engine import Seq2SeqEngine, engine_class
from unit.finetune.helpers import make_model_dir, make_tokenizer_dir

PROMPTS = ["hello there", "What arguments does os.path.join take?", "tell me a joke",
           "where does dumps come from in the json module?", "hi", "how do I read a file?"]  # fmt: skip


@pytest.fixture(scope="module")
def s2s_dir(tmp_path_factory):
    """A random bart-micro (init_std 0.2: varied greedy text) with a tokenizer."""
    from lmforge.model.config import preset_config
    from lmforge.model.convert import save_pretrained
    from lmforge.model.seq2seq import Seq2SeqLM
    from lmforge.tokenizer.files import TokenizerFiles, copy_tokenizer_files

    root = tmp_path_factory.mktemp("s2s")
    tok_dir = make_tokenizer_dir(root / "tok")
    tok = TokenizerFiles.load(tok_dir)
    torch.manual_seed(0)
    model = Seq2SeqLM(preset_config("bart-micro", vocab_size=tok.vocab_size, init_std=0.2))
    out = root / "model"
    gen = {"decoder_start_token_id": tok.pad_id, "eos_token_id": [tok.eos_id]}
    save_pretrained(model, out, extra_config={"pad_token_id": tok.pad_id}, generation_config=gen)
    copy_tokenizer_files(tok_dir, out)
    return out


def _reference(engine: Seq2SeqEngine, ids: list[list[int]], n: int, **kw) -> list[list[int]]:
    """generate_seq2seq on the sources as fine-tuning builds them (ending in eos)."""
    sources = [source_row(p, engine.source_eos, engine.max_context) for p in ids]
    return generate_seq2seq_batched(
        engine.model, sources, n, decoder_start_id=engine.decoder_start_id, **kw,
        pad_id=engine.files.pad_id, greedy=True,
    )  # fmt: skip


def test_engine_class_by_config(s2s_dir, tmp_path):
    assert engine_class(s2s_dir) is Seq2SeqEngine
    tok = make_tokenizer_dir(tmp_path / "tok")
    assert engine_class(make_model_dir(tmp_path / "causal", tok)) is Engine


def test_compile_on_warns_and_decodes_eagerly(s2s_dir, caplog):
    """Compiled decoding (model/compiled_decode.py) steps causal models; a seq2seq dir asked
    for it says so and serves eagerly rather than failing the server."""
    with caplog.at_level("WARNING", logger="lmforge.serve.seq2seq_engine"):
        engine = Seq2SeqEngine.from_dir(s2s_dir, name="s2s", compile="on")
    assert not engine.compiled_decode
    assert "s2s: compiled decoding is for causal models; it decodes eagerly" in caplog.text


def test_joining_at_different_steps_equals_batched_generate(s2s_dir):
    engine = Seq2SeqEngine.from_dir(s2s_dir, name="s2s", max_batch_size=4)
    engine.start()
    try:
        ids = [engine.files.encode(p) for p in PROMPTS]
        handles = []
        for i, prompt in enumerate(ids):  # staggered: several cohorts run at once
            params = SamplingParams(max_tokens=10 + i, temperature=0.0, ignore_eos=True)
            handles.append(engine.submit(prompt, params, f"r{i}"))
            time.sleep(0.02)
        outs = [collect(h) for h in handles]
        for i, (out, prompt) in enumerate(zip(outs, ids, strict=True)):
            want = _reference(engine, [prompt], 10 + i)[0]
            assert out.token_ids == want and out.finish_reason == "length"
        assert len({tuple(o.token_ids[:6]) for o in outs}) > 2  # the model's text varies
        stats = engine.stats()
        assert stats.prefills >= 2 and stats.finished == len(PROMPTS) and stats.running == 0
    finally:
        engine.shutdown()


def test_stops_abort_and_bad_input(s2s_dir):
    engine = Seq2SeqEngine.from_dir(s2s_dir, name="s2s")
    engine.start()
    try:
        ids = [engine.files.encode(p) for p in PROMPTS[:3]]
        assert engine.source_eos == engine.files.eos_id
        ref = _reference(engine, ids, 12, stop_tokens=sorted(engine.model_stops))
        outs = [collect(engine.submit(p, SamplingParams(max_tokens=12, temperature=0.0),
                                      f"s{i}")) for i, p in enumerate(ids)]  # fmt: skip
        for out, want in zip(outs, ref, strict=True):
            assert out.token_ids == want
        long = engine.submit(ids[0], SamplingParams(max_tokens=100, ignore_eos=True), "long")
        engine.abort("long")
        assert collect(long).finish_reason == "abort"
        with pytest.raises(Exception, match="must each fit"):
            engine.submit(ids[0], SamplingParams(max_tokens=500), "big")
        assert engine.render_chat([{"role": "system", "content": "x"},
                                   {"role": "user", "content": "hi there"}]) == "hi there"  # fmt: skip
    finally:
        engine.shutdown()


def test_a_source_is_never_cut_to_make_room_for_its_eos(s2s_dir):
    """source_row appends eos within the context: the longest source taken is one shorter, and
    one token more is refused, not silently cut."""
    engine = Seq2SeqEngine.from_dir(s2s_dir, name="s2s")
    engine.start()
    try:
        n = engine.max_context
        assert engine.source_eos is not None and engine.max_source == n - 1
        assert engine.token_room(n - 1) == n - 1 and engine.token_room(n) == -1
        whole = [7] * (n - 2) + [9]  # its last token must reach the encoder
        out = collect(engine.submit(whole, SamplingParams(max_tokens=4, temperature=0.0), "w"))
        assert (
            out.token_ids
            == _reference(engine, [whole], 4, stop_tokens=sorted(engine.model_stops))[0]
        )
        with pytest.raises(InputError, match=f"source: at most {n - 1} tokens"):
            engine.submit([*whole, 9], SamplingParams(max_tokens=4), "over")
    finally:
        engine.shutdown()


def test_server_gives_the_decoder_its_whole_context_whatever_the_source(s2s_dir, tmp_path):
    """A causal model's prompt + max_tokens share the context; a seq2seq source does not."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from lmforge.serve.server import create_app
    from lmforge.serve.settings import ServeSettings

    settings = ServeSettings(models=[{"name": "s2s", "path": s2s_dir}], feedback_db=tmp_path / "f")
    with TestClient(create_app(settings)) as client:
        n = client.app.state.serve.engines["s2s"].max_context
        source = [7] * (n - 8)
        body = {"model": "s2s", "prompt": source, "max_tokens": 40, "temperature": 0,
                "ignore_eos": True}  # fmt: skip
        r = client.post("/v1/completions", json=body)  # source + max_tokens > n: still fits
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 40
        assert r.json()["choices"][0]["finish_reason"] == "length"
        r = client.post("/v1/completions", json={**body, "max_tokens": n})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        message = r.json()["error"]["message"]  # the source does not share the decoder's room
        assert f"leaves {n - 1} for an answer to this {n - 8}-token prompt" in message
        assert f"at most {n - 1}" in message
        r = client.post("/v1/completions", json={**body, "prompt": [7] * (n + 1)})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        chat = {"model": "s2s", "temperature": 0, "ignore_eos": True,
                "messages": [{"role": "user", "content": " ".join(PROMPTS[1:4])}]}  # fmt: skip
        r = client.post("/v1/chat/completions", json=chat)  # no max_tokens: the room is filled
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert n // 2 < usage["prompt_tokens"] <= n and usage["completion_tokens"] == n - 1
        tools = [{"type": "function", "function": {"name": "f"}}]
        r = client.post("/v1/chat/completions", json={**chat, "tools": tools})
        assert r.status_code == 400 and "seq2seq model" in r.json()["error"]["message"]


FUNCTIONS = {
    "os.path": [("os.path.join", "(a, *p)", "Join two or more pathname components."),
                ("os.path.split", "(p)", "Split a pathname into a pair (head, tail).")],
    "json": [("json.dumps", "(obj, **kw)", "Serialize obj to a JSON formatted str.")],
}  # fmt: skip


@pytest.fixture
def rag_setup(s2s_dir, tmp_path):
    """A knowledge base laid out as the knowledge-base stage writes it, and a copy of the model
    directory that records retrieval.json (2 passages in 100 source tokens: this tokenizer makes
    the question 39 tokens, each passage over 40, so both get trimmed)."""
    import json
    import shutil

    from lmforge.serve.retrieval import KnowledgeBase
    from lmforge.serve.retrieval_spec import RetrievalSpec

    docs = tmp_path / "kb"
    docs.mkdir()
    for module, fns in FUNCTIONS.items():
        lines = [json.dumps({"id": q, "text": f"{q}{sig}\n{doc}"}) for q, sig, doc in fns]
        (docs / f"{module}.jsonl").write_text("\n".join(lines) + "\n")
    kb = KnowledgeBase.build(docs, tmp_path / "kb.db")
    model_dir = tmp_path / "rag-model"
    shutil.copytree(s2s_dir, model_dir)
    spec = RetrievalSpec(passages=2, source_tokens=100)
    spec.save(model_dir)
    yield kb, model_dir, spec
    kb.close()


def _chat(engine, store, question, **req):
    import asyncio
    from types import SimpleNamespace

    from lmforge.serve.completions import CompletionService
    from lmforge.serve.protocol import ChatRequest

    state = SimpleNamespace(engines={"m": engine}, kb=store, safety=None, cache=None)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": question}]
    request = ChatRequest(model="m", messages=messages, max_tokens=4, **req)
    return asyncio.run(CompletionService(state).prepare_chat(request))


def test_chat_source_with_kb_equals_the_training_source(rag_setup):
    from lmforge.finetune.dialogue import Retrieved

    kb, model_dir, spec = rag_setup
    engine = Seq2SeqEngine.from_dir(model_dir, name="rag")
    assert engine.retrieval == spec
    question = "How do I join two or more pathname components?"
    prep = _chat(engine, kb, question)
    row = {"context": question, "response": "Use os.path.join.", "intent": "ask_usage"}
    train = Retrieved([row], engine.files, spec, kb)  # the dialogue stage's sources
    assert prep.jobs[0].prompt_text == train.sources[0]
    assert prep.jobs[0].prompt_ids == engine.files.encode(train.sources[0])
    assert train.sources[0].startswith(f"{question}\n[1] os.path.join(a, *p) Join two")
    assert "\n[2] os.path.split(p)" in train.sources[0]
    assert 90 < len(engine.files.encode(train.sources[0])) <= spec.source_tokens
    assert (
        [s["source"] for s in prep.sources] == train.found[0] == ["os.path.join", "os.path.split"]
    )


def test_model_that_expects_passages_without_a_kb_warns_once(rag_setup, s2s_dir, caplog):
    kb, model_dir, _ = rag_setup
    engine = Seq2SeqEngine.from_dir(model_dir, name="rag")
    question = "What is the signature of json.dumps?"
    with caplog.at_level("WARNING", logger="lmforge.serve.seq2seq_engine"):
        assert _chat(engine, None, question).jobs[0].prompt_text == question
        assert _chat(engine, kb, question, kb=False).jobs[0].prompt_text == question
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "rag was trained on sources with 2 knowledge-base passages" in warnings[0]
    assert "serve it with --kb" in warnings[0]
    plain = Seq2SeqEngine.from_dir(s2s_dir, name="plain")  # trained without: user turn, kb or not
    assert plain.retrieval is None
    assert _chat(plain, kb, question).jobs[0].prompt_text == question


def _complete(engine, store, prompt, **req):
    import asyncio
    from types import SimpleNamespace

    from lmforge.serve.completions import CompletionService
    from lmforge.serve.protocol import CompletionRequest

    state = SimpleNamespace(engines={"m": engine}, kb=store, safety=None, cache=None)
    request = CompletionRequest(model="m", prompt=prompt, max_tokens=4, **req)
    return asyncio.run(CompletionService(state).prepare_completion(request))


def test_completion_prompt_gets_the_chat_source_and_sources(rag_setup, caplog):
    """A plain prompt to a model trained with passages is its user turn, as in chat."""
    kb, model_dir, _ = rag_setup
    engine = Seq2SeqEngine.from_dir(model_dir, name="rag")
    question = "How do I join two or more pathname components?"
    chat = _chat(engine, kb, question)
    with caplog.at_level("WARNING", logger="lmforge.serve.seq2seq_engine"):
        prep = _complete(engine, kb, question)
    assert not caplog.records  # passages: no warning
    assert prep.jobs[0].prompt_text == chat.jobs[0].prompt_text
    assert prep.jobs[0].prompt_text.startswith(f"{question}\n[1] os.path.join(a, *p)")
    assert prep.jobs[0].prompt_ids == chat.jobs[0].prompt_ids
    assert prep.sources == [{**s, "prompt_index": 0} for s in chat.sources]
    two = _complete(engine, kb, ["What is the signature of json.dumps?", question])
    assert [(s["prompt_index"], s["source"]) for s in two.sources][:1] == [(0, "json.dumps")]
    assert [s["source"] for s in two.sources if s["prompt_index"] == 1] == [
        "os.path.join", "os.path.split"
    ]  # fmt: skip
    ids = engine.files.encode(question)  # a token prompt is a finished source: sent as is
    assert _complete(engine, kb, ids).jobs[0].prompt_ids == ids


def test_completion_without_passages_warns_and_kb_true_is_refused_where_it_cannot_apply(
    rag_setup, s2s_dir, caplog
):
    from lmforge.serve.protocol import APIError

    kb, model_dir, _ = rag_setup
    engine = Seq2SeqEngine.from_dir(model_dir, name="rag")
    question = "What is the signature of json.dumps?"
    with caplog.at_level("WARNING", logger="lmforge.serve.seq2seq_engine"):
        prep = _complete(engine, None, question)
        assert _complete(engine, kb, question, kb=False).sources is None
    assert prep.jobs[0].prompt_text == question and prep.sources is None
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "but this request has none" in warnings[0]
    with pytest.raises(APIError, match="no knowledge base") as err:
        _complete(engine, None, question, kb=True)
    assert err.value.status == 400
    plain = Seq2SeqEngine.from_dir(s2s_dir, name="plain")
    assert _complete(plain, kb, question).sources is None  # prompts go as written
    assert _complete(plain, kb, question).jobs[0].prompt_text == question
    with pytest.raises(APIError, match="not trained with knowledge-base passages"):
        _complete(plain, kb, question, kb=True)


def test_a_blank_text_prompt_is_refused_as_chat_refuses_a_blank_user_message(rag_setup):
    """A model trained with passages answers a user turn: a blank one is a 400 on both routes,
    not a source of passages for nothing."""
    from lmforge.serve.protocol import APIError

    kb, model_dir, _ = rag_setup
    engine = Seq2SeqEngine.from_dir(model_dir, name="rag")
    with pytest.raises(APIError) as chat:
        _chat(engine, kb, " \n\t")
    with pytest.raises(APIError) as completion:
        _complete(engine, kb, ["What is the signature of json.dumps?", " \n\t"])
    assert chat.value.status == completion.value.status == 400
    assert completion.value.param == "prompt"
    assert str(completion.value) == "a seq2seq model answers a user message; prompt 1 is blank"
    assert str(chat.value).endswith(
        "a seq2seq model answers a user message; the conversation has none"
    )
    ids = engine.files.encode(" ")  # a token prompt is a finished source: sent as is
    assert _complete(engine, kb, ids).jobs[0].prompt_ids == ids


def test_min_score_leaves_weak_passages_out_in_training_and_serving(rag_setup):
    """The spec's BM25 floor applies where training builds sources and where the server does."""
    from lmforge.finetune.dialogue import Retrieved
    from lmforge.serve.retrieval_spec import RetrievalSpec

    kb, model_dir, _ = rag_setup
    question = "How do I join two or more pathname components?"
    scores = [p.score for p in kb.search(question, 2)]
    assert scores[0] > scores[1] > 0
    floor = (scores[0] + scores[1]) / 2
    assert [p.score for p in kb.search(question, 2, min_score=floor)] == scores[:1]
    spec = RetrievalSpec(passages=2, source_tokens=100, min_score=floor)
    spec.save(model_dir)
    assert RetrievalSpec.load(model_dir) == spec
    engine = Seq2SeqEngine.from_dir(model_dir, name="rag")
    rows = [{"context": q, "response": "", "intent": "greeting"} for q in (question, "hi there")]
    train = Retrieved(rows, engine.files, spec, kb)
    assert train.found == [["os.path.join"], []]
    for row, source in zip(rows, train.sources, strict=True):
        assert _chat(engine, kb, row["context"]).jobs[0].prompt_text == source
        assert _complete(engine, kb, row["context"]).jobs[0].prompt_text == source
    assert train.sources[1] == "hi there" and "\n[2]" not in train.sources[0]


def test_a_checkpoints_logits_rules_decode_as_generate_seq2seq(s2s_dir):
    """The rules a summarizer's generation_config asks for (no repeated n-grams, a minimum
    length, forced first and last tokens) count the decoder's tokens from its start, as
    generate_seq2seq applies them; a row without rules in the same batch is untouched."""
    from lmforge.model.logits_rules import LogitsRules

    engine = Seq2SeqEngine.from_dir(s2s_dir, device="cpu", max_batch_size=4)
    engine.start()
    try:
        ids = [engine.files.encode(p) for p in PROMPTS[:2]]
        stops = sorted(engine.model_stops)
        rules = LogitsRules(no_repeat_ngram_size=1, min_new_tokens=6, forced_bos_token_id=7,
                            forced_eos_token_id=stops[0])  # fmt: skip
        ruled = SamplingParams(max_tokens=9, temperature=0.0, rules=rules)
        plain = SamplingParams(max_tokens=9, temperature=0.0)
        handles = [engine.submit(ids[0], ruled, "r"), engine.submit(ids[1], plain, "p")]
        outs = [collect(h) for h in handles]
        want = _reference(engine, ids[:1], 9, stop_tokens=stops, rules=rules)[0]
        assert outs[0].token_ids == want
        assert want[0] == 7 and want[-1] == stops[0] and len(set(want)) == len(want)
        assert outs[1].token_ids == _reference(engine, ids[1:], 9, stop_tokens=stops)[0]
    finally:
        engine.shutdown()


def test_logit_bias_and_min_tokens_steer_the_decoder_per_row(s2s_dir):
    """A seq2seq batch: +100 forces a token, -100 bans the greedy one, min_tokens holds off the
    stop tokens, and the row without any decodes as generate_seq2seq."""
    engine = Seq2SeqEngine.from_dir(s2s_dir, device="cpu", max_batch_size=4)
    engine.start()
    try:
        ids = engine.files.encode(PROMPTS[0])
        want = _reference(engine, [ids], 6)[0]
        eos = sorted(engine.model_stops)[0]
        asks = {
            "plain": SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
            "forced": SamplingParams(max_tokens=3, temperature=0.0, logit_bias=((9, 100.0),)),
            "banned": SamplingParams(
                max_tokens=6, temperature=0.0, ignore_eos=True, logit_bias=((want[0], -100.0),)
            ),
            "held": SamplingParams(
                max_tokens=6,
                temperature=0.0,
                logit_bias=((eos, 100.0),),
                rules=LogitsRules(min_new_tokens=4),
            ),
        }
        handles = {name: engine.submit(ids, p, name) for name, p in asks.items()}
        out = {name: collect(h).token_ids for name, h in handles.items()}
        assert out["plain"] == want
        assert out["forced"] == [9, 9, 9]
        assert want[0] not in out["banned"] and len(out["banned"]) == 6
        assert out["held"][4] == eos and eos not in out["held"][:4]
    finally:
        engine.shutdown()


def test_penalized_rows_leaving_a_cohort_keep_decoding_as_generate_seq2seq(s2s_dir):
    """A cohort's rows ask for a repetition penalty and an n-gram ban and end at different steps:
    the kept per-row state (serve/row_batch.py), regrouped as rows leave, gives each the tokens
    generate_seq2seq gives it alone (the penalty counting the decoder's start token)."""
    engine = Seq2SeqEngine.from_dir(s2s_dir, device="cpu", max_batch_size=4)
    rules = LogitsRules(no_repeat_ngram_size=2)
    ids = [engine.files.encode(p) for p in PROMPTS[:3]]
    lengths = [3, 6, 10]
    handles = [  # queued before the loop starts: one cohort
        engine.submit(ids[i], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                                             repetition_penalty=1.5, rules=rules), f"r{i}")
        for i, n in enumerate(lengths)
    ]  # fmt: skip
    engine.start()
    try:
        outs = [collect(h).token_ids for h in handles]
        want = [
            _reference(engine, [ids[i]], n, repetition_penalty=1.5, rules=rules)[0]
            for i, n in enumerate(lengths)
        ]
        assert outs == want and [len(o) for o in outs] == lengths
        assert engine.stats().prefills == 1  # one cohort, regrouped as its rows left
        assert want[2] != _reference(engine, ids[2:], 10)[0]  # the penalty and ban did decide
    finally:
        engine.shutdown()
