"""`lmforge serve` flags: help with an example, one-line errors before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[3] / "src"


def lmforge(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [sys.executable, "-m", "lmforge.cli", *args], capture_output=True, text=True, env=env
    )


def test_help_has_an_example_and_every_flag():
    out = lmforge("serve", "--help").stdout
    assert "Example: lmforge serve --model" in out
    for flag in ("--model", "--api-key", "--workers", "--kb", "--safety", "--feedback-db",
                 "--max-batch-size", "--max-queue", "--request-timeout", "--threads", "--loop",
                 "--http", "bench"):  # fmt: skip
        assert flag in out, flag


# every `lmforge serve` option, in --help order, with its default (as before serve_cmd's options
# moved into aliases: the list must not change by accident)
SERVE_OPTIONS = [
    (["--model"], None), (["--lora", "--lora-modules"], None),
    (["--allow-runtime-lora-updating"], False), (["--host"], "127.0.0.1"), (["--port"], 8000),
    (["--api-key"], None), (["--workers"], 1), (["--kb"], None), (["--safety"], None),
    (["--feedback-db"], None), (["--max-batch-size"], 32), (["--max-queue"], 256),
    (["--request-timeout"], 120.0), (["--device"], "auto"), (["--config"], None),
    (["--threads"], None), (["--compile"], "off"), (["--generation-config"], "auto"),
    (["--prefix-cache-mb"], 256), (["--loop"], "auto"), (["--http"], "auto"),
    (["--embed-pooling"], "auto"), (["--embed-normalize"], None),
]  # fmt: skip


def test_serve_keeps_every_option_with_its_default_and_help():
    import typer.main
    from typer.testing import CliRunner

    from lmforge.cli import app

    params = typer.main.get_command(app).commands["serve"].params
    assert [(p.opts, p.default) for p in params] == SERVE_OPTIONS
    assert all(p.help for p in params)
    out = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["serve", "--help"]).output
    for opts, _ in SERVE_OPTIONS:
        assert all(opt in out for opt in opts), opts


def test_bad_flags_are_one_line_errors(tmp_path):
    r = lmforge("serve")
    assert r.returncode == 2 and "needs --model" in r.stderr + r.stdout
    r = lmforge("serve", "--model", str(tmp_path / "missing"))
    assert r.returncode == 2 and "is not a directory" in r.stderr + r.stdout
    (tmp_path / "a").mkdir()
    r = lmforge("serve", "--model", f"x={tmp_path / 'a'}", "--model", f"x={tmp_path / 'a'}")
    assert r.returncode == 2 and "used twice" in r.stderr + r.stdout


def test_torch_threads_come_from_the_flag_then_omp_then_cpus_shared_by_workers(
    tmp_path, monkeypatch
):
    import torch

    from lmforge.common.threads import usable_cpus
    from lmforge.serve.engine import _configure_threads
    from lmforge.serve.settings import ServeSettings

    def settings(**kw):
        return ServeSettings(models=[{"name": "m", "path": tmp_path}], **kw)

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert settings(threads=3).torch_threads() == 3
    assert settings().torch_threads() == usable_cpus()
    assert settings(workers=64).torch_threads() == max(1, usable_cpus() // 64)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert settings().torch_threads() is None  # torch already took OMP_NUM_THREADS
    assert settings(threads=2).torch_threads() == 2  # the flag wins
    before = torch.get_num_threads()
    try:
        _configure_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_serve_yaml_keeps_its_values_unless_a_flag_is_given(tmp_path, monkeypatch):
    import yaml
    from typer.testing import CliRunner

    import lmforge.serve.server as server
    from lmforge.cli import app

    (tmp_path / "m").mkdir()
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "models": [{"name": "m", "path": str(tmp_path / "m")}], "port": 9001, "loop": "asyncio",
        "compile": "on", "max_batch_size": 4, "request_timeout_s": 7.0,
    }))  # fmt: skip
    started = []
    monkeypatch.setattr(server, "serve", started.append)
    result = CliRunner().invoke(app, ["serve", "--config", str(config), "--max-batch-size", "8"])
    assert result.exit_code == 0, result.output
    (settings,) = started
    assert (settings.port, settings.loop, settings.compile) == (9001, "asyncio", "on")
    assert settings.request_timeout_s == 7.0  # flags left at their defaults leave the file alone
    assert settings.max_batch_size == 8  # a flag given wins
    result = CliRunner().invoke(app, ["serve", "--config", str(config), "--request-timeout", "3"])
    assert result.exit_code == 0, result.output
    assert started[-1].request_timeout_s == 3.0 and started[-1].port == 9001
    assert (started[-1].kb, started[-1].feedback_db, started[-1].safety) == (None, None, None)
    # the flags naming models and stores override the file's too (they were dropped before)
    (tmp_path / "n").mkdir()
    typed = ["--model", f"n={tmp_path / 'n'}", "--kb", str(tmp_path / "docs"),
             "--feedback-db", str(tmp_path / "f.db"), "--safety", str(tmp_path / "s.yaml")]  # fmt: skip
    result = CliRunner().invoke(app, ["serve", "--config", str(config), *typed])
    assert result.exit_code == 0, result.output
    settings = started[-1]
    assert [(m.name, m.path) for m in settings.models] == [("n", tmp_path / "n")]
    assert (settings.kb, settings.feedback_db) == (tmp_path / "docs", tmp_path / "f.db")
    assert settings.safety == tmp_path / "s.yaml" and settings.port == 9001


def test_no_flag_left_at_its_default_overrides_a_serve_yaml(tmp_path, monkeypatch):
    import yaml
    from typer.testing import CliRunner

    import lmforge.serve.server as server
    from lmforge.cli import app
    from lmforge.cli.serve import SETTING_FLAGS
    from lmforge.serve.recipe_config import load_serve_config

    (tmp_path / "m").mkdir()
    # every setting a flag sets, at a value other than the flag's default
    values = {
        "models": [{"name": "m", "path": str(tmp_path / "m")}], "host": "0.0.0.0", "port": 9001,
        "workers": 3, "kb": str(tmp_path / "docs"), "safety": str(tmp_path / "s.yaml"),
        "feedback_db": str(tmp_path / "f.db"), "device": "cpu", "max_batch_size": 4,
        "max_queue": 8, "request_timeout_s": 7.0, "threads": 2, "compile": "on",
        "generation_config": "none", "loop": "asyncio", "http": "h11", "prefix_cache_mb": 1.5,
        "embed_pooling": "mean", "embed_normalize": False, "api_key": "file-key",
        "loras": [{"name": "ad", "path": str(tmp_path / "ad"), "base_model_name": "m"}],
    }  # fmt: skip
    assert set(SETTING_FLAGS.values()) - set(values) == {"runtime_lora_updating"}  # below
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(values))
    started = []
    monkeypatch.setattr(server, "serve", started.append)
    result = CliRunner().invoke(app, ["serve", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert started[-1].model_dump() == load_serve_config(config).model_dump()
    # a boolean flag: the file's true stays unless --no-... is typed; typed, either way wins
    values |= {"workers": 1, "runtime_lora_updating": True, "embed_normalize": False}
    config.write_text(yaml.safe_dump(values))
    for typed, want in (([], (True, False)),
                        (["--no-allow-runtime-lora-updating", "--embed-normalize"], (False, True))):  # fmt: skip
        result = CliRunner().invoke(app, ["serve", "--config", str(config), *typed])
        assert result.exit_code == 0, result.output
        assert (started[-1].runtime_lora_updating, started[-1].embed_normalize) == want


def test_generation_config_flag_defaults_to_auto_and_none_turns_it_off(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import lmforge.serve.server as server
    from lmforge.cli import app

    (tmp_path / "m").mkdir()
    started = []
    monkeypatch.setattr(server, "serve", started.append)
    for extra, want in (([], "auto"), (["--generation-config", "none"], "none")):
        result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "m"), *extra])
        assert result.exit_code == 0, result.output
        assert started[-1].generation_config == want
    result = CliRunner().invoke(
        app, ["serve", "--model", str(tmp_path / "m"), "--generation-config", "vllm"]
    )
    assert result.exit_code != 0 and "generation_config" in str(result.exception or result.output)
