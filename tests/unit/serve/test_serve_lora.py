"""LoRA adapters over HTTP: a real uvicorn on 127.0.0.1 serving a base and its adapters, read by
the official openai client, answers each adapter as a server of its merged model does (greedy
tokens and logprobs), alone and in a burst mixing the base and two adapters (completions, chat,
streaming, n, stop strings, guided output); /v1/models lists adapters with parent and root as
vLLM; /metrics and the feedback store name the adapter; an adapter's own chat template is used;
the base's embeddings are the base's; start-up refuses bad adapters and leaves nothing running."""

from __future__ import annotations

import json
import shutil
import sqlite3
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from pydantic import ValidationError

from lmforge.errors import ConfigError, InputError
from lmforge.serve.metrics import ServerMetrics
from lmforge.serve.settings import ServeSettings, parse_lora_specs
from lmforge.serve.state import ServeState, start_engines
from unit.serve.lora_helpers import two_adapters

TEMPLATE = (
    "{% for m in messages %}{{ '### ' + m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant: ' }}{% endif %}"
)
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = ["What is the capital", "def f(x): return x + 1", "os.path.join joins paths. " * 4]
MERGED = {"base": "plain", "a1": "m1", "a2": "m2"}  # what each served name is, merged


@pytest.fixture(scope="module")
def lora_dirs(serve_model_dir, tmp_path_factory):
    dirs = two_adapters(serve_model_dir, tmp_path_factory)
    chat = tmp_path_factory.mktemp("chat") / "adapter"  # a1 shipped with its own chat template
    shutil.copytree(dirs["a1"][0], chat)
    (chat / "chat_template.jinja").write_text(TEMPLATE, encoding="utf-8")
    return {**dirs, "a1-chat": (chat, None)}


@pytest.fixture(scope="module")
def servers(serve_model_dir, lora_dirs, openai_server, tmp_path_factory):
    """(LoRA server: base + a1 + a2 + a1-chat, server of the merged models and the plain base,
    the LoRA server's feedback db)."""
    db = tmp_path_factory.mktemp("lora-feedback") / "feedback.db"
    loras = [{"name": name, "path": adapter} for name, (adapter, _) in lora_dirs.items()]
    lora = openai_server([{"name": "base", "path": serve_model_dir}], loras=loras, feedback_db=db)
    merged = openai_server(
        [{"name": "m1", "path": lora_dirs["a1"][1]}, {"name": "m2", "path": lora_dirs["a2"][1]},
         {"name": "plain", "path": serve_model_dir}],
        feedback_db=tmp_path_factory.mktemp("merged-feedback") / "feedback.db",
    )  # fmt: skip
    return lora, merged, db


def test_models_lists_adapters_with_their_parent_and_root(servers, serve_model_dir, lora_dirs):
    lora, _, _ = servers
    data = {m.id: m.model_extra for m in lora.models.list().data}
    assert list(data) == ["base", "a1", "a2", "a1-chat"]
    assert data["base"]["parent"] is None and data["base"]["root"] == str(serve_model_dir)
    for name in ("a1", "a2"):
        assert data[name]["parent"] == "base"
        assert data[name]["root"] == str(lora_dirs[name][0])
        assert data[name]["tasks"] == ["generate"]
        assert data[name]["max_model_len"] == data["base"]["max_model_len"]


def _complete(client, model: str, prompt: str, **kw):
    out = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0,
                                    logprobs=2, extra_body={"ignore_eos": True}, **kw)  # fmt: skip
    choice = out.choices[0]
    return choice.text, choice.logprobs.tokens, choice.logprobs.token_logprobs


@pytest.mark.parametrize("name", ["a1", "a2"])
def test_an_adapters_greedy_answer_is_its_merged_models(servers, name):
    lora, merged, _ = servers
    for prompt in PROMPTS:
        text, tokens, logprobs = _complete(lora, name, prompt)
        want_text, want_tokens, want_logprobs = _complete(merged, MERGED[name], prompt)
        assert (text, tokens) == (want_text, want_tokens)
        assert logprobs == pytest.approx(want_logprobs, abs=1e-4)
    assert _complete(lora, name, PROMPTS[0])[1] != _complete(lora, "base", PROMPTS[0])[1]


def _ask(client, model: str, kind: str) -> list[str]:
    """One request of a kind the burst mixes; the text of each choice."""
    common = dict(model=model, max_tokens=10, extra_body={"ignore_eos": True})
    if kind == "chat":
        out = client.chat.completions.create(messages=CHAT, temperature=0, **common)
        return [c.message.content for c in out.choices]
    if kind == "stream":
        chunks = client.completions.create(prompt=PROMPTS[1], temperature=0, stream=True, **common)
        return ["".join(c.choices[0].text for c in chunks if c.choices)]
    if kind == "n":  # sampled, seeded: the same answers in any batch
        out = client.completions.create(prompt=PROMPTS[2], n=2, seed=7, temperature=1.0, **common)
        return [c.text for c in out.choices]
    if kind == "stop":
        full = client.completions.create(prompt=PROMPTS[0], temperature=0, **common).choices[0]
        stop = full.text[3:5] or "x"  # cut inside the answer
        out = client.completions.create(prompt=PROMPTS[0], temperature=0, stop=[stop], **common)
        return [out.choices[0].text, out.choices[0].finish_reason]
    out = client.completions.create(  # guided: one of the choices, whichever the model prefers
        prompt=PROMPTS[1], temperature=0, model=model, max_tokens=10,
        extra_body={"guided_choice": ["alpha-beta", "gamma", "the capital"]},
    )  # fmt: skip
    return [out.choices[0].text]


KINDS = ["chat", "stream", "n", "stop", "guided"]


def test_a_burst_mixing_the_base_and_two_adapters_answers_each_as_alone(servers):
    lora, merged, _ = servers
    asks = [(name, kind) for kind in KINDS for name in ("base", "a1", "a2")]
    alone = {(name, kind): _ask(merged, MERGED[name], kind) for name, kind in asks}
    with ThreadPoolExecutor(len(asks)) as pool:  # all at once: one running batch
        burst = dict(zip(asks, pool.map(lambda ask: _ask(lora, *ask), asks), strict=True))
    assert burst == alone
    assert alone["a1", "chat"] != alone["base", "chat"]


def test_metrics_and_feedback_name_the_adapter(servers):
    lora, _, db = servers  # prompts no other test sends: the response cache does not answer
    _complete(lora, "a2", "The capital is")
    text = urllib.request.urlopen(str(lora.base_url).replace("/v1/", "/metrics")).read().decode()
    requests = _metric(text, 'lmforge_model_requests_total{model="a2"}')
    generated = _metric(text, 'lmforge_generation_tokens_total{model="a2"}')
    assert requests >= 1 and generated >= 8
    _complete(lora, "a2", "Return the absolute value")
    text = urllib.request.urlopen(str(lora.base_url).replace("/v1/", "/metrics")).read().decode()
    assert _metric(text, 'lmforge_model_requests_total{model="a2"}') == requests + 1
    assert _metric(text, 'lmforge_generation_tokens_total{model="a2"}') == generated + 8
    with sqlite3.connect(db) as conn:
        models = {m for (m,) in conn.execute("SELECT model FROM responses")}
    assert "a2" in models


def _metric(text: str, series: str) -> float:
    return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith(series))  # fmt: skip


def test_chat_uses_the_adapter_directorys_own_template(servers):
    lora, _, _ = servers
    chat = lora.chat.completions.create(model="a1-chat", messages=CHAT, max_tokens=8,
                                        temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
    rendered = "### user: What is the capital of France?\n### assistant: "
    assert chat.choices[0].message.content == _complete(lora, "a1", rendered)[0]
    base_template = lora.chat.completions.create(model="a1", messages=CHAT, max_tokens=8,
                                                 temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
    assert base_template.choices[0].message.content != chat.choices[0].message.content


def test_the_bases_embeddings_stay_the_bases(servers):
    lora, merged, _ = servers
    _complete(lora, "a1", PROMPTS[0])  # adapters have run on the shared module
    got = lora.embeddings.create(model="base", input=PROMPTS).data
    want = merged.embeddings.create(model="plain", input=PROMPTS).data
    for g, w in zip(got, want, strict=True):
        assert g.embedding == pytest.approx(w.embedding, abs=1e-5)
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError, match="LoRA adapter: it serves completions and"):
        lora.embeddings.create(model="a1", input=PROMPTS)


# -- start-up ----------------------------------------------------------------------------------


def test_a_bad_adapter_stops_start_up_naming_it_and_leaves_no_engine(
    serve_model_dir, lora_dirs, tmp_path
):
    bad = tmp_path / "bad"
    shutil.copytree(lora_dirs["a1"][0], bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    settings = ServeSettings(
        models=[{"name": "base", "path": serve_model_dir}],
        loras=[{"name": "good", "path": lora_dirs["a2"][0]}, {"name": "bad", "path": bad}],
        feedback_db=tmp_path / "f.db",
    )
    state = ServeState(settings, ServerMetrics())
    with pytest.raises(InputError, match=r"LoRA adapter 'bad' .* rank r=3"):
        start_engines(state)
    assert not state.engines and not state.adapters and not state.embedders


def test_adapter_names_and_specs_are_checked(serve_model_dir, lora_dirs):
    a1 = lora_dirs["a1"][0]
    with pytest.raises(ValidationError, match="'base' is given to two served models"):
        ServeSettings(models=[{"name": "base", "path": serve_model_dir}],
                      loras=[{"name": "base", "path": a1}])  # fmt: skip
    vllm = json.dumps({"name": "x", "path": str(a1), "base_model_name": "base"})
    assert [s.model_dump() for s in parse_lora_specs([f"y={a1}", vllm])] == [
        {"name": "y", "path": a1, "base_model_name": None},
        {"name": "x", "path": a1, "base_model_name": "base"},
    ]
    with pytest.raises(ConfigError, match="give NAME=ADAPTER_DIR"):
        parse_lora_specs([str(a1)])
    with pytest.raises(ConfigError, match="not a directory"):
        parse_lora_specs([f"z={a1}/nope"])


def test_the_cli_takes_lora_and_vllms_lora_modules_on_flags_and_in_a_serve_yaml(
    serve_model_dir, lora_dirs, tmp_path, monkeypatch
):
    import yaml
    from typer.testing import CliRunner

    import lmforge.serve.server as server
    from lmforge.cli import app

    a1, a2 = lora_dirs["a1"][0], lora_dirs["a2"][0]
    started = []
    monkeypatch.setattr(server, "serve", started.append)
    vllm = json.dumps({"name": "two", "path": str(a2), "base_model_name": "base"})
    flags = ["--model", f"base={serve_model_dir}", "--lora", f"one={a1}", "--lora-modules", vllm]
    result = CliRunner().invoke(app, ["serve", *flags])
    assert result.exit_code == 0, result.output
    assert [(s.name, s.path, s.base_model_name) for s in started[-1].loras] == [
        ("one", a1, None), ("two", a2, "base"),
    ]  # fmt: skip
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "models": [{"name": "base", "path": str(serve_model_dir)}],
        "loras": [{"name": "one", "path": str(a1)}],
    }))  # fmt: skip
    result = CliRunner().invoke(app, ["serve", "--config", str(config), "--lora", f"two={a2}"])
    assert result.exit_code == 0, result.output
    assert [s.name for s in started[-1].loras] == ["one", "two"]
    assert not started[-1].runtime_lora_updating
    result = CliRunner().invoke(app, ["serve", *flags, "--allow-runtime-lora-updating"])
    assert result.exit_code == 0 and started[-1].runtime_lora_updating


def test_runtime_loading_behind_its_flag(
    servers, serve_model_dir, lora_dirs, openai_server, tmp_path
):
    import httpx

    lora, merged, _ = servers
    off = str(lora.base_url).removesuffix("/v1/")
    # flag off: no such route (the chat page's static mount answers a POST with 405)
    assert httpx.post(f"{off}/v1/load_lora_adapter", json={}).status_code in (404, 405)
    client = openai_server([{"name": "base", "path": serve_model_dir}], runtime_lora_updating=True,
                           feedback_db=tmp_path / "feedback.db")  # fmt: skip  # not the cwd's
    url = str(client.base_url).removesuffix("/v1/")
    load = {"lora_name": "late", "lora_path": str(lora_dirs["a2"][0])}
    answer = httpx.post(f"{url}/v1/load_lora_adapter", json=load)
    assert answer.status_code == 200 and "added successfully" in answer.text
    models = {m.id: m.model_extra for m in client.models.list().data}
    assert models["late"]["parent"] == "base" and models["late"]["root"] == load["lora_path"]
    assert _complete(client, "late", PROMPTS[2])[:2] == _complete(merged, "m2", PROMPTS[2])[:2]
    again = httpx.post(f"{url}/v1/load_lora_adapter", json=load)
    assert again.status_code == 400 and "served already" in again.json()["error"]["message"]
    bad = httpx.post(f"{url}/v1/load_lora_adapter", json={**load, "lora_name": "x",
                                                         "lora_path": str(serve_model_dir)})  # fmt: skip
    assert bad.status_code == 400 and "adapter_config.json is missing" in bad.text

    gone = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "late"})
    assert gone.status_code == 200 and "removed successfully" in gone.text
    assert "late" not in {m.id for m in client.models.list().data}
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.NotFoundError):
        _complete(client, "late", PROMPTS[2])
    unknown = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "late"})
    assert unknown.status_code == 404
    with pytest.raises(ValidationError, match="needs --workers 1"):
        ServeSettings(models=[{"name": "b", "path": serve_model_dir}], workers=2,
                      runtime_lora_updating=True)  # fmt: skip


def test_two_runtime_loads_of_one_name_on_two_bases_serve_it_once(
    serve_model_dir, lora_dirs, tmp_path, monkeypatch
):
    import threading
    import time

    import lmforge.serve.state as state_module
    from lmforge.serve.state import load_adapter, stop_engines

    settings = ServeSettings(
        models=[{"name": "b1", "path": serve_model_dir}, {"name": "b2", "path": serve_model_dir}],
        runtime_lora_updating=True, feedback_db=tmp_path / "f.db",
    )  # fmt: skip
    state = ServeState(settings, ServerMetrics())
    start_engines(state)
    read = state_module.read_adapter

    def slow_read(*args):  # widens the window between the name's check and its serving
        time.sleep(0.3)
        return read(*args)

    monkeypatch.setattr(state_module, "read_adapter", slow_read)
    errors = []

    def load(base: str) -> None:
        try:
            load_adapter(state, "x", lora_dirs["a1"][0], base)
        except InputError as exc:
            errors.append(str(exc))

    try:
        threads = [threading.Thread(target=load, args=(b,)) for b in ("b1", "b2")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(errors) == 1 and "'x' is served already" in errors[0]
        assert sum("x" in engine._lora for engine in state.engines.values()) == 1
    finally:
        stop_engines(state)


def test_a_request_for_an_adapter_unloaded_meanwhile_is_a_404(serve_model_dir, lora_dirs, tmp_path):
    """The request resolved the adapter's name, then the adapter left its engine before submit:
    404 model_not_found, as for any model not served (not a 400 naming max_tokens)."""
    from fastapi.testclient import TestClient

    from lmforge.serve.server import create_app

    settings = ServeSettings(models=[{"name": "base", "path": serve_model_dir}],
                             loras=[{"name": "a1", "path": lora_dirs["a1"][0]}],
                             feedback_db=tmp_path / "f.db")  # fmt: skip
    app = create_app(settings)
    with TestClient(app) as client:
        app.state.serve.engines["base"].unload_adapter("a1")  # its route still resolves it
        answer = client.post(
            "/v1/completions", json={"model": "a1", "prompt": "x", "max_tokens": 2}
        )
    assert answer.status_code == 404
    error = answer.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "'a1' does not exist" in error["message"]


def test_an_unloaded_adapters_metrics_series_are_dropped(serve_model_dir, lora_dirs, tmp_path):
    from fastapi.testclient import TestClient

    from lmforge.serve.server import create_app

    settings = ServeSettings(models=[{"name": "base", "path": serve_model_dir}],
                             runtime_lora_updating=True, feedback_db=tmp_path / "f.db")  # fmt: skip
    ask = {"prompt": "x", "max_tokens": 2, "temperature": 0}
    with TestClient(create_app(settings)) as client:
        load = {"lora_name": "late", "lora_path": str(lora_dirs["a1"][0])}
        assert client.post("/v1/load_lora_adapter", json=load).status_code == 200
        for model in ("late", "base"):
            assert client.post("/v1/completions", json={**ask, "model": model}).status_code == 200
        before = client.get("/metrics").text
        assert 'lmforge_model_requests_total{model="late"} 1.0' in before
        assert 'lmforge_time_to_first_token_seconds_count{model="late"}' in before
        unload = client.post("/v1/unload_lora_adapter", json={"lora_name": "late"})
        assert unload.status_code == 200
        after = client.get("/metrics").text
    assert 'model="late"' not in after
    assert 'lmforge_model_requests_total{model="base"} 1.0' in after
