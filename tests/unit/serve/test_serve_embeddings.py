"""/v1/embeddings under a real uvicorn on 127.0.0.1, read by the official openai client: an
encoder (bert-micro, and the same encoder as a mean-pooled classifier's directory) and a micro
decoder. Vectors equal our own forward + pooling and, for the encoder, transformers' BertModel +
mean pooling over the mask; float and base64 agree; token ids equal text; concurrent requests
equal serial ones; the errors say what is wrong. The Embedder's batching and pooling choices are
checked on their own below."""

from __future__ import annotations

import base64
import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("fastapi")
pytest.importorskip("openai")
pytest.importorskip("transformers")

import openai
import transformers

from lmforge.errors import ConfigError, InputError
from lmforge.finetune.heads import mean_pool
from lmforge.model.convert import MEAN_HEAD, MEAN_HEAD_KEY, ClassifierHead, load_pretrained
from lmforge.model.convert.mean_head import save_mean_head
from lmforge.serve.embeddings import Embedder, embedder_settings
from lmforge.serve.embeddings_pooling import (
    checkpoint_normalize,
    checkpoint_pooling,
    resolve_pooling,
)
from lmforge.serve.engine_types import EngineClosed
from lmforge.serve.launch import free_port
from lmforge.serve.server import create_app
from lmforge.serve.settings import ServeSettings
from lmforge.tokenizer.files import TokenizerFiles
from unit.finetune.encoder_tokenizers import bert_tokenizer_dir
from unit.finetune.helpers import make_model_dir
from unit.serve.test_serve_uvicorn import running

TEXTS = ["The capital is Paris.", "x y", "def f(x): return x + 1 and more words here", "a"]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed-encoder")
    return make_model_dir(root / "enc", bert_tokenizer_dir(root / "tok"), preset="bert-micro",
                          init_std=0.2)  # fmt: skip


@pytest.fixture(scope="module")
def classifier_dir(encoder_dir, tmp_path_factory):
    """The encoder as a mean-pooled classifier's final/: the encoder + its head file."""
    out = tmp_path_factory.mktemp("embed-classifier") / "final"
    shutil.copytree(encoder_dir, out)
    head = ClassifierHead(torch.randn(2, 64), ["no", "yes"], torch.zeros(2), pooling="mean")
    save_mean_head(head, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, MEAN_HEAD_KEY: MEAN_HEAD}))
    return out


def sentence_transformers_dir(encoder_dir, out, modes: dict[str, bool], extra=()):
    """The encoder as sentence-transformers saves one: modules.json + 1_Pooling/config.json."""
    shutil.copytree(encoder_dir, out)
    st = "sentence_transformers.models."
    modules = [{"idx": 0, "name": "0", "path": "", "type": f"{st}Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": f"{st}Pooling"},
               *extra]  # fmt: skip
    (out / "modules.json").write_text(json.dumps(modules))
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 64, "pooling_mode_mean_tokens": False, **modes})
    )
    return out


NORM = {
    "idx": 2,
    "name": "2",
    "path": "2_Normalize",
    "type": "sentence_transformers.models.Normalize",
}


@pytest.fixture(scope="module")
def cls_dir(encoder_dir, tmp_path_factory):
    """The encoder as a sentence-transformers checkpoint trained with CLS pooling and
    normalised (as BGE)."""
    out = tmp_path_factory.mktemp("embed-st") / "st"
    return sentence_transformers_dir(encoder_dir, out, {"pooling_mode_cls_token": True}, [NORM])


@pytest.fixture(scope="module")
def server(encoder_dir, classifier_dir, cls_dir, serve_model_dir, tmp_path_factory):
    settings = ServeSettings(
        models=[{"name": "enc", "path": encoder_dir}, {"name": "clf", "path": classifier_dir},
                {"name": "dec", "path": serve_model_dir}, {"name": "st", "path": cls_dir}],
        feedback_db=tmp_path_factory.mktemp("embed-fb") / "f.db", port=free_port(),
        loop="asyncio", http="h11",
    )  # fmt: skip
    with running(settings, create_app(settings)):
        yield f"http://127.0.0.1:{settings.port}"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="-", max_retries=0)


def vectors(response) -> np.ndarray:
    return np.array([d.embedding for d in sorted(response.data, key=lambda d: d.index)])


def our_vectors(model_dir, rows: list[list[int]], pooling: str) -> np.ndarray:
    """Each row alone through our model, pooled and L2-normalised: the reference."""
    model = load_pretrained(model_dir)
    out = []
    with torch.no_grad():
        for ids in rows:
            h = model.hidden_states(torch.tensor([ids]))  # (1, T, C)
            pooled = mean_pool(h, torch.ones(1, len(ids))) if pooling == "mean" else h[:, -1]
            out.append(F.normalize(pooled, dim=-1)[0].numpy())
    return np.stack(out)


def test_encoder_vectors_equal_ours_and_transformers_mean_pooling(client, encoder_dir):
    got = client.embeddings.create(model="enc", input=TEXTS, encoding_format="float")
    files = TokenizerFiles.load(encoder_dir)
    rows = [files.encode_input(t)[0] for t in TEXTS]
    assert rows[0][0] == files.tokenizer.token_to_id("[CLS]")  # the template's specials
    assert got.usage.prompt_tokens == got.usage.total_tokens == sum(map(len, rows))
    assert got.model == "enc" and [d.index for d in got.data] == [0, 1, 2, 3]
    assert np.abs(vectors(got) - our_vectors(encoder_dir, rows, "mean")).max() <= 1e-5

    # transformers' BertModel over the padded batch, mean over its attention mask
    tok = transformers.AutoTokenizer.from_pretrained(encoder_dir)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    bert = transformers.BertModel.from_pretrained(encoder_dir, add_pooling_layer=False).eval()
    with torch.no_grad():
        h = bert(**batch).last_hidden_state
    theirs = F.normalize(mean_pool(h, batch["attention_mask"]), dim=-1).numpy()
    assert np.abs(vectors(got) - theirs).max() <= 1e-4
    assert np.abs(np.linalg.norm(vectors(got), axis=1) - 1).max() <= 1e-5


def test_base64_and_token_ids_give_the_same_vectors(client, encoder_dir):
    floats = vectors(client.embeddings.create(model="enc", input=TEXTS, encoding_format="float"))
    raw = client.embeddings.create(model="enc", input=TEXTS, encoding_format="base64")
    decoded = np.stack(
        [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in raw.data]
    )
    assert decoded.shape == (4, 64) and np.array_equal(decoded, floats.astype(np.float32))
    # the client's default (it asks for base64 and decodes it) says the same
    assert np.array_equal(vectors(client.embeddings.create(model="enc", input=TEXTS)), decoded)
    files = TokenizerFiles.load(encoder_dir)
    rows = [files.encode_input(t)[0] for t in TEXTS]
    by_ids = client.embeddings.create(model="enc", input=rows, encoding_format="float")
    assert np.abs(vectors(by_ids) - floats).max() <= 1e-6
    one = client.embeddings.create(model="enc", input=rows[0], encoding_format="float")
    assert np.abs(vectors(one)[0] - floats[0]).max() <= 1e-6
    single = client.embeddings.create(model="enc", input=TEXTS[0], encoding_format="float")
    assert np.abs(vectors(single)[0] - floats[0]).max() <= 1e-6


def test_a_mean_pooled_classifier_dir_embeds_with_its_encoder(client):
    enc = vectors(client.embeddings.create(model="enc", input=TEXTS, encoding_format="float"))
    clf = vectors(client.embeddings.create(model="clf", input=TEXTS, encoding_format="float"))
    assert np.abs(clf - enc).max() <= 1e-6
    with pytest.raises(openai.BadRequestError, match="'clf' is an embedding model"):
        client.completions.create(model="clf", prompt="x y", max_tokens=2)


def test_decoder_pools_its_last_token_and_still_generates(client, serve_model_dir):
    got = client.embeddings.create(model="dec", input=TEXTS, encoding_format="float")
    files = TokenizerFiles.load(serve_model_dir)
    rows = [files.encode_input(t)[0] for t in TEXTS]
    assert rows[0] == files.encode(TEXTS[0])  # this tokenizer adds no specials
    assert got.usage.prompt_tokens == sum(map(len, rows))
    assert np.abs(vectors(got) - our_vectors(serve_model_dir, rows, "last")).max() <= 1e-5
    done = client.completions.create(model="dec", prompt="Hello", max_tokens=3, temperature=0)
    assert done.usage.completion_tokens >= 1


@pytest.mark.parametrize("model", ["enc", "dec"])
def test_sixteen_concurrent_requests_equal_serial_ones(client, model):
    texts = [" ".join(TEXTS[: 1 + i % 4]) + f" {i}" * (i % 5) for i in range(16)]

    def embed(text: str) -> np.ndarray:
        got = client.embeddings.create(model=model, input=text, encoding_format="float")
        return vectors(got)[0]

    serial = np.stack([embed(t) for t in texts])
    with ThreadPoolExecutor(16) as pool:
        concurrent = np.stack(list(pool.map(embed, texts)))
    assert np.abs(concurrent - serial).max() <= 1e-5


def test_errors_name_the_input_and_what_to_do(client, server, encoder_dir):
    too_long = [5] * 129  # bert-micro's context is 128
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="enc", input=[[5, 6], too_long])
    assert "input[1] is 129 tokens, more than enc's context of 128 tokens" in err.value.message
    assert err.value.code == "context_length_exceeded"
    cut = client.embeddings.create(model="enc", input=[too_long], encoding_format="float",
                                   extra_body={"truncate_prompt_tokens": 128})  # fmt: skip
    whole = client.embeddings.create(model="enc", input=[too_long[:128]], encoding_format="float")
    assert cut.usage.prompt_tokens == 128 and np.array_equal(vectors(cut), vectors(whole))
    long_text = " ".join(["alpha"] * 300)
    cut = client.embeddings.create(model="enc", input=long_text, encoding_format="float",
                                   extra_body={"truncate_prompt_tokens": -1})  # fmt: skip
    assert cut.usage.prompt_tokens == 128  # [CLS] + 126 words + [SEP]

    cases = [
        ({"input": "x", "dimensions": 32}, "dimensions=32: enc makes 64-dimensional"),
        ({"input": ""}, "input[0] is empty"),
        ({"input": ["x", ""]}, "input[1] is empty"),
        ({"input": []}, "input is empty"),
        ({"input": [[1, 9999]]}, "input[0] has token ids outside the vocabulary"),
        ({"input": "x", "truncate_prompt_tokens": 500}, "truncate_prompt_tokens=500 must be"),
        ({"input": "x y", "truncate_prompt_tokens": 1},
         "input[0]: truncate_prompt_tokens=1 leaves no room for the text's special tokens"),
    ]  # fmt: skip
    for body, message in cases:
        r = httpx.post(f"{server}/v1/embeddings", json={"model": "enc", **body})
        assert r.status_code == 400 and message in r.json()["error"]["message"], (body, r.text)
    assert len(vectors(client.embeddings.create(model="enc", input="x", dimensions=64))[0]) == 64

    with pytest.raises(openai.BadRequestError, match="'enc' is an embedding model: it serves"):
        client.chat.completions.create(model="enc", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError, match="serves: clf, dec, enc, st"):
        client.embeddings.create(model="nope", input="x")


def test_models_and_metrics_list_the_embedding_models(client, server):
    models = {m.id: m.model_extra["max_model_len"] for m in client.models.list().data}
    assert models == {"enc": 128, "clf": 128, "dec": 128, "st": 128}
    tasks = {m.id: m.model_extra["tasks"] for m in client.models.list().data}
    embed, both = ["embed"], ["generate", "embed"]
    assert tasks == {"enc": embed, "clf": embed, "dec": both, "st": embed}  # the chat page reads it
    assert list(tasks) == ["enc", "clf", "dec", "st"]  # as the settings list them
    client.embeddings.create(model="enc", input=["x", "y z"])
    metrics = httpx.get(f"{server}/metrics").text
    requests = [line for line in metrics.splitlines()
                if line.startswith('lmforge_embedding_requests_total{model="enc"}')]  # fmt: skip
    assert requests and float(requests[0].split()[-1]) >= 1
    assert 'lmforge_embedding_tokens_total{model="enc"}' in metrics
    assert 'lmforge_requests_total{endpoint="/v1/embeddings",status="200"}' in metrics


def test_waiting_inputs_run_sorted_in_padded_batches_equal_to_one_at_a_time(encoder_dir):
    model = load_pretrained(encoder_dir)
    files = TokenizerFiles.load(encoder_dir)
    rows = [files.encode_input(t)[0] for t in TEXTS * 4]
    embedder = Embedder(model, files, name="enc", max_batch_tokens=128)
    shapes = []
    forward = embedder._forward
    embedder._forward = lambda batch: shapes.append([len(r) for r in batch]) or forward(batch)
    futures = [embedder.submit(r) for r in rows]  # all waiting before the thread starts
    embedder.start()
    batched = torch.stack([f.result(timeout=30) for f in futures])
    embedder.shutdown()
    assert sum(map(len, shapes)) == 16 and len(shapes) < 16  # several inputs per forward
    assert all(b == sorted(b) and max(b) * len(b) <= 128 for b in shapes)  # sorted, bounded
    alone = torch.stack([forward([r])[0] for r in rows])
    assert (batched - alone).abs().max().item() <= 1e-5


def test_a_sentence_transformers_dir_is_pooled_as_its_pooling_module_says(
    client, cls_dir, encoder_dir, tmp_path
):
    got = client.embeddings.create(model="st", input=TEXTS, encoding_format="float")
    files = TokenizerFiles.load(cls_dir)
    model = load_pretrained(cls_dir)
    with torch.no_grad():
        first = [model.hidden_states(torch.tensor([files.encode_input(t)[0]]))[0, 0] for t in TEXTS]
    want = F.normalize(torch.stack(first), dim=-1).numpy()
    assert np.abs(vectors(got) - want).max() <= 1e-5
    settings = ServeSettings(models=[{"name": "st", "path": cls_dir}])
    assert embedder_settings(settings, cls_dir)["pooling"] == "cls"
    assert embedder_settings(settings, encoder_dir)["pooling"] == "auto"  # no modules.json
    flagged = ServeSettings(models=[{"name": "st", "path": cls_dir}], embed_pooling="mean")
    assert embedder_settings(flagged, cls_dir)["pooling"] == "mean"  # the flag wins

    maxed = sentence_transformers_dir(
        encoder_dir, tmp_path / "max", {"pooling_mode_max_tokens": True}
    )
    with pytest.raises(
        ConfigError, match=r"1_Pooling/config.json: pooling pooling_mode_max_tokens"
    ):
        checkpoint_pooling(maxed)
    dense = {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    densed = sentence_transformers_dir(encoder_dir, tmp_path / "dense",
                                       {"pooling_mode_mean_tokens": True}, [dense])  # fmt: skip
    with pytest.raises(ConfigError, match=r"lists sentence_transformers\.models\.Dense, which"):
        checkpoint_pooling(densed)


def test_normalising_follows_the_normalize_module_and_bad_files_are_named(
    cls_dir, encoder_dir, tmp_path
):
    settings = ServeSettings(models=[{"name": "st", "path": cls_dir}])
    assert embedder_settings(settings, cls_dir)["normalize"] is True  # Normalize listed
    assert embedder_settings(settings, encoder_dir)["normalize"] is True  # no modules.json
    plain = sentence_transformers_dir(encoder_dir, tmp_path / "plain",
                                      {"pooling_mode_mean_tokens": True})  # fmt: skip
    assert checkpoint_normalize(plain) is False
    assert embedder_settings(settings, plain)["normalize"] is False  # as vLLM: not normalised
    off = ServeSettings(models=[{"name": "st", "path": cls_dir}], embed_normalize=False)
    assert embedder_settings(off, cls_dir)["normalize"] is False  # the flag wins

    (plain / "1_Pooling" / "config.json").unlink()
    with pytest.raises(
        ConfigError, match=r"1_Pooling/config.json \(its Pooling module's config\) is missing"
    ):
        checkpoint_pooling(plain)
    (plain / "modules.json").write_text("[{")
    bad = r"modules\.json is not valid JSON \(line 1 column 3.*save the model again"
    with pytest.raises(InputError, match=bad):  # as model.convert reads the same file
        checkpoint_pooling(plain)
    (plain / "modules.json").write_text('{"type": "x"}')
    with pytest.raises(ConfigError, match=r"modules.json: expected a JSON list of modules"):
        checkpoint_normalize(plain)


def test_cls_pooling_without_normalising_is_the_first_state(encoder_dir, serve_model_dir):
    model = load_pretrained(encoder_dir)
    files = TokenizerFiles.load(encoder_dir)
    embedder = Embedder(model, files, name="enc", pooling="cls", normalize=False)
    ids = files.encode_input(TEXTS[0])[0]
    with torch.no_grad():
        first = model.hidden_states(torch.tensor([ids]))[0, 0]
    assert torch.allclose(embedder.embed([ids])[0], first, atol=1e-6)
    assert resolve_pooling("auto", causal=False, name="e") == "mean"
    assert resolve_pooling("auto", causal=True, name="d") == "last"
    with pytest.raises(ConfigError, match="--embed-pooling cls: d is a causal model"):
        resolve_pooling("cls", causal=True, name="d")


def test_a_shut_down_embedder_refuses_and_fails_what_waits(encoder_dir):
    from lmforge.serve.engine_types import EngineClosed, QueueFull

    files = TokenizerFiles.load(encoder_dir)
    embedder = Embedder(load_pretrained(encoder_dir), files, name="enc", max_queue=1)
    waiting = embedder.submit([2, 3])  # never started: it waits
    with pytest.raises(QueueFull):
        embedder.submit([2, 3])
    embedder.shutdown(drain=False)
    with pytest.raises(EngineClosed):
        waiting.result(timeout=5)
    with pytest.raises(EngineClosed, match="shut down"):
        embedder.submit([2, 3])


def test_embed_flags_reach_the_settings(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import lmforge.serve.server as server_module
    from lmforge.cli import app

    (tmp_path / "m").mkdir()
    started = []
    monkeypatch.setattr(server_module, "serve", started.append)
    flags = ["--embed-pooling", "cls", "--no-embed-normalize"]
    for extra, want in (([], ("auto", None)), (flags, ("cls", False))):
        result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "m"), *extra])
        assert result.exit_code == 0, result.output
        assert (started[-1].embed_pooling, started[-1].embed_normalize) == want
    result = CliRunner().invoke(
        app, ["serve", "--model", str(tmp_path / "m"), "--embed-pooling", "max"]
    )
    assert result.exit_code != 0 and "embed_pooling" in str(result.exception or result.output)


def test_a_failing_forward_fails_only_its_batch(encoder_dir):
    files = TokenizerFiles.load(encoder_dir)
    embedder = Embedder(load_pretrained(encoder_dir), files, name="enc", max_batch_tokens=128)
    forward = embedder._forward

    def fails_on_long_rows(batch):
        if max(map(len, batch)) > 20:
            raise RuntimeError("out of memory")
        return forward(batch)

    embedder._forward = fails_on_long_rows
    short, long = [2, 3, 4], [5] * 60  # 60 * 3 > 128: the short rows batch apart
    futures = embedder.submit_many([long, short, long, short])  # one take, two batches
    embedder.start()
    for f in (futures[0], futures[2]):
        with pytest.raises(RuntimeError, match="out of memory"):
            f.result(timeout=30)
    alone = forward([short])[0]
    for f in (futures[1], futures[3]):
        assert torch.allclose(f.result(timeout=30), alone, atol=1e-5)
    assert embedder.submit(short).result(timeout=30) is not None  # the thread goes on
    embedder.shutdown()


def test_a_request_queues_whole_and_may_be_larger_than_the_queue(encoder_dir):
    from lmforge.serve.engine_types import QueueFull

    files = TokenizerFiles.load(encoder_dir)
    embedder = Embedder(load_pretrained(encoder_dir), files, name="enc", max_queue=4)
    big = embedder.submit_many([[2, 3]] * 10)  # an empty queue takes a request of any size
    with pytest.raises(QueueFull, match="10 inputs waiting, 1 more would pass 4"):
        embedder.submit([2, 3])
    assert embedder.queue_depth() == 10  # nothing of the refused request queued
    embedder.start()
    assert len({tuple(f.result(timeout=30).tolist()) for f in big}) == 1
    embedder.shutdown()


@pytest.mark.parametrize("compile", ["off", "on"])
def test_a_decoder_embeds_while_its_engine_generates_on_the_same_module(
    serve_model_dir, compile, monkeypatch
):
    """The embedder's thread and the engine's run forward on one module at once (eager, or
    the engine's decoding step torch.compile'd under compile on): neither changes what the
    other computes, since a forward without a cache writes no module state."""
    from lmforge.model import compiled_decode
    from lmforge.serve.engine import Engine, SamplingParams, collect

    monkeypatch.setattr(compiled_decode, "BACKEND", "aot_eager")  # seconds, not inductor's
    engine = Engine.from_dir(serve_model_dir, device="cpu", max_batch_size=4, compile=compile)
    embedder = Embedder(engine.model, engine.files, name="dec", max_batch_size=4)
    rows = [engine.files.encode_input(t)[0] for t in TEXTS * 2]
    prompts = [engine.files.encode(t) for t in TEXTS]

    def generate() -> list[list[int]]:  # staggered lengths: batches of 4, 3, 2, 1 rows
        handles = [engine.submit(p, SamplingParams(max_tokens=16 + 8 * i, temperature=0.0,
                                                   ignore_eos=True), f"r{i}")
                   for i, p in enumerate(prompts)]  # fmt: skip
        return [collect(h).token_ids for h in handles]

    vectors_alone = torch.stack(embedder.embed(rows))
    engine.start()
    try:
        tokens_alone = generate()
        embedder.start()
        with ThreadPoolExecutor(1) as pool:
            generating = pool.submit(generate)
            together, overlapping = [], 0
            while not generating.done() or not together:
                futures = embedder.submit_many(rows)
                overlapping += not generating.done()  # queued while the engine still decodes
                together.append(torch.stack([f.result(30) for f in futures]))
            assert generating.result(timeout=60) == tokens_alone
        assert overlapping >= 1
        for got in together:
            assert (got - vectors_alone).abs().max().item() <= 1e-5
    finally:
        embedder.shutdown()
        engine.shutdown(drain=False)


def test_a_text_that_tokenizes_to_nothing_is_a_400_not_a_nan_vector():
    from types import SimpleNamespace

    from lmforge.serve.embeddings_api import EmbeddingRequest, input_rows
    from lmforge.serve.protocol import APIError

    # as a tokenizer that strips the text and adds no specials would
    def tokenize(text: str, max_len: int | None) -> list[int]:
        return [] if text.isspace() else [3]

    dropping = SimpleNamespace(dim=4, max_context=8, vocab_size=10, tokenize=tokenize)
    assert input_rows(dropping, EmbeddingRequest(model="m", input=["x"])) == [[3]]
    with pytest.raises(APIError, match=r"input\[1\] has no tokens once tokenized"):
        input_rows(dropping, EmbeddingRequest(model="m", input=["x", " "]))


def test_a_bf16_model_pools_and_normalises_in_float32(encoder_dir):
    model = load_pretrained(encoder_dir).to(torch.bfloat16)
    files = TokenizerFiles.load(encoder_dir)
    rows = [files.encode_input(t)[0] for t in TEXTS]
    embedder = Embedder(model, files, name="enc")
    got = [embedder.embed([r])[0] for r in rows]  # alone: the same bf16 states as below
    with torch.no_grad():
        want = [F.normalize(model.hidden_states(torch.tensor([r]))[0].float().mean(0), dim=-1)
                for r in rows]  # fmt: skip
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32 and (g - w).abs().max().item() <= 1e-6


def test_the_response_body_is_openais_shape(server):
    body = httpx.post(f"{server}/v1/embeddings", json={"model": "enc", "input": ["a b", "c"]})
    body = body.raise_for_status().json()
    assert set(body) == {"object", "data", "model", "usage"}
    assert body["object"] == "list" and body["model"] == "enc"
    assert [set(d) for d in body["data"]] == [{"object", "index", "embedding"}] * 2
    assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", 0), ("embedding", 1)]
    assert all(isinstance(x, float) for d in body["data"] for x in d["embedding"])
    usage = body["usage"]
    assert set(usage) == {"prompt_tokens", "total_tokens"}
    assert usage["prompt_tokens"] == usage["total_tokens"] == 4 + 3  # [CLS] a b [SEP] + 3


def test_models_are_listed_in_the_settings_order(tmp_path):
    from types import SimpleNamespace

    from lmforge.serve.state import ServeState

    names = ["s2s", "dec", "enc"]  # generation only, both, embeddings only
    settings = ServeSettings(models=[{"name": n, "path": tmp_path} for n in names])
    m = SimpleNamespace(max_context=8)
    state = ServeState(settings, metrics=None, engines={"dec": m, "s2s": m},
                       embedders={"dec": m, "enc": m})  # fmt: skip
    assert list(state.max_context()) == names
    assert [state.tasks(n) for n in names] == [["generate"], ["generate", "embed"], ["embed"]]


def test_truncate_prompt_tokens_cuts_as_vllm_text_head_with_specials_ids_tail(encoder_dir):
    from lmforge.serve.embeddings_api import EmbeddingRequest, input_rows

    files = TokenizerFiles.load(encoder_dir)
    embedder = Embedder(load_pretrained(encoder_dir), files, name="enc")
    ids = [5 + i % 30 for i in range(130)]  # more than the context of 128; head != tail
    text = " ".join(["alpha", "beta", "gamma"] * 20)
    whole = files.encode_input(text)[0]  # [CLS] ... [SEP]

    def cut(x, k):
        return input_rows(embedder, EmbeddingRequest(model="enc", input=x,
                                                     truncate_prompt_tokens=k))  # fmt: skip

    assert cut([ids], 5) == [ids[-5:]]  # token ids: the last k, as vLLM cuts token prompts
    assert cut([ids], -1) == [ids[-128:]]  # -1: the context's worth, from the end
    assert cut([ids[:3]], 5) == [ids[:3]]  # shorter than k: as sent
    assert cut(text, 6) == [whole[:5] + whole[-1:]]  # a text: its head, [CLS] and [SEP] kept


def old_layout_dir(encoder_dir, out, max_seq_length: int):
    """The encoder as sentence-transformers (< 2.0) saved one: the model, its tokenizer and
    sentence_bert_config.json in 0_Transformer/, a top-level config.json of its own versions."""
    st = "sentence_transformers.models."
    shutil.copytree(encoder_dir, out / "0_Transformer")
    (out / "0_Transformer" / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False})
    )
    (out / "config.json").write_text(json.dumps({"__version__": {"sentence_transformers": "0.3"}}))
    (out / "modules.json").write_text(json.dumps(
        [{"idx": 0, "name": "0", "path": "0_Transformer", "type": f"{st}Transformer"},
         {"idx": 1, "name": "1", "path": "1_Pooling", "type": f"{st}Pooling"}, NORM]
    ))  # fmt: skip
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    return out


def test_max_seq_length_bounds_inputs_as_vllm_and_the_old_layout_is_read(encoder_dir, tmp_path):
    from lmforge.model.convert import resolve_model_dir
    from lmforge.serve.embeddings_api import EmbeddingRequest, input_rows
    from lmforge.serve.model_dir import load_served_model, model_tasks
    from lmforge.serve.protocol import APIError

    st = sentence_transformers_dir(encoder_dir, tmp_path / "st", {"pooling_mode_mean_tokens": True})
    (st / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16}))
    settings = ServeSettings(models=[{"name": "st", "path": st}])
    keywords = embedder_settings(settings, st)
    assert keywords["max_seq_length"] == 16
    embedder = Embedder(load_pretrained(st), TokenizerFiles.load(st), name="st", **keywords)
    assert embedder.max_context == 16  # what /v1/models reports as its max_model_len
    with pytest.raises(APIError, match=r"input\[0\] is 17 tokens, more than st's context of 16"):
        input_rows(embedder, EmbeddingRequest(model="st", input=[list(range(5, 22))]))
    req = EmbeddingRequest(model="st", input=" ".join(["alpha"] * 40), truncate_prompt_tokens=-1)
    assert len(input_rows(embedder, req)[0]) == 16

    (st / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": "long"}))
    with pytest.raises(ConfigError, match=r"sentence_bert_config\.json: max_seq_length 'long'"):
        embedder_settings(settings, st)

    old = old_layout_dir(encoder_dir, tmp_path / "old", max_seq_length=24)
    assert resolve_model_dir(old) == old / "0_Transformer"
    assert model_tasks(old).embed
    keywords = embedder_settings(settings, old)
    assert (keywords["pooling"], keywords["normalize"], keywords["max_seq_length"]) == (
        "cls", True, 24)  # fmt: skip
    served = load_served_model(old, name="old")
    embedder = Embedder(served.model, served.files, name="old", **keywords)
    ids = TokenizerFiles.load(encoder_dir).encode_input(TEXTS[0])[0]
    with torch.no_grad():
        first = load_pretrained(encoder_dir).hidden_states(torch.tensor([ids]))[0, 0]
    assert torch.allclose(embedder.embed([ids])[0], F.normalize(first, dim=-1), atol=1e-5)


def test_a_dense_module_is_refused_even_with_both_flags(encoder_dir, tmp_path):
    dense = {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    densed = sentence_transformers_dir(encoder_dir, tmp_path / "dense",
                                       {"pooling_mode_mean_tokens": True}, [dense])  # fmt: skip
    flagged = ServeSettings(models=[{"name": "d", "path": densed}], embed_pooling="mean",
                            embed_normalize=True)  # fmt: skip
    with pytest.raises(ConfigError, match=r"lists sentence_transformers\.models\.Dense, which"):
        embedder_settings(flagged, densed)


def test_shutdown_drains_every_engine_at_once(encoder_dir):
    import time

    from lmforge.serve.metrics import ServerMetrics
    from lmforge.serve.state import ServeState, stop_engines

    files = TokenizerFiles.load(encoder_dir)
    model = load_pretrained(encoder_dir)
    settings = ServeSettings(models=[{"name": "a", "path": encoder_dir}], graceful_timeout_s=1.0)
    state = ServeState(settings=settings, metrics=ServerMetrics())
    busy = []
    for name in ("a", "b"):  # each stuck in a 3 s forward: neither drains within the timeout
        embedder = Embedder(model, files, name=name)
        embedder._forward = lambda rows: time.sleep(3) or torch.zeros(len(rows), 64)
        busy.append(embedder.submit_many([[2, 3], [2, 4]]))
        embedder.max_batch_size = 1  # the second input waits behind the first
        embedder.start()
        state.embedders[name] = embedder
    time.sleep(0.2)  # both threads inside their first forward
    start = time.perf_counter()
    stop_engines(state)
    took = time.perf_counter() - start
    assert 1.0 <= took < 1.8, took  # one graceful timeout, not one per embedder (2 s)
    for futures in busy:
        with pytest.raises(EngineClosed):
            futures[1].result(timeout=0)  # what the drain did not reach failed, not left hanging


def test_matryoshka_dimensions_cut_then_renormalise_only_where_the_config_says(
    encoder_dir, tmp_path
):
    import asyncio

    from lmforge.serve.embeddings_api import EmbeddingRequest, create_embeddings
    from lmforge.serve.metrics import ServerMetrics
    from lmforge.serve.protocol import APIError
    from lmforge.serve.state import ServeState

    def with_config(name, **keys):
        out = tmp_path / name
        shutil.copytree(encoder_dir, out)
        config = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**config, **keys}))
        return out

    settings = ServeSettings(models=[{"name": "m", "path": encoder_dir}])
    listed = with_config("listed", matryoshka_dimensions=[32, 16])
    assert embedder_settings(settings, listed)["matryoshka"] == (16, 32)
    assert embedder_settings(settings, encoder_dir)["matryoshka"] is None  # not Matryoshka
    assert embedder_settings(settings, with_config("any", is_matryoshka=True))["matryoshka"] == ()
    with pytest.raises(ConfigError, match=r"config\.json: matryoshka_dimensions 'x' is not"):
        embedder_settings(settings, with_config("bad", matryoshka_dimensions="x"))

    def embed(path, normalize=True, **body):
        keywords = {**embedder_settings(settings, path), "normalize": normalize}
        embedder = Embedder(load_pretrained(path), TokenizerFiles.load(path), name="m", **keywords)
        state = ServeState(settings=settings, metrics=ServerMetrics(), embedders={"m": embedder})
        try:
            embedder.start()
            out = asyncio.run(create_embeddings(state, EmbeddingRequest(model="m", **body)))
            return np.array(out["data"][0]["embedding"])
        finally:
            embedder.shutdown()

    full = embed(listed, input=TEXTS[0])
    short = embed(listed, input=TEXTS[0], dimensions=16)
    assert short.shape == (16,) and abs(np.linalg.norm(short) - 1) < 1e-5
    assert np.abs(short - full[:16] / np.linalg.norm(full[:16])).max() < 1e-6
    raw = embed(listed, normalize=False, input=TEXTS[0], dimensions=16)  # as vLLM: cut only
    assert np.abs(raw - embed(listed, normalize=False, input=TEXTS[0])[:16]).max() < 1e-6
    assert embed(listed, input=TEXTS[0], dimensions=64).shape == (64,)  # its own size
    with pytest.raises(APIError, match="dimensions=24: m gives vectors of 16, 32 dimensions"):
        embed(listed, input="x", dimensions=24)
    assert embed(with_config("any2", is_matryoshka=True), input="x", dimensions=24).shape == (24,)
    with pytest.raises(APIError, match="dimensions=65: m gives vectors of 1 to 64 dimensions"):
        embed(with_config("any3", is_matryoshka=True), input="x", dimensions=65)
    with pytest.raises(APIError, match="dimensions=16: m makes 64-dimensional embeddings and is "
                       "not a Matryoshka model"):  # fmt: skip
        embed(encoder_dir, input="x", dimensions=16)
