"""Fixtures: a micro chat model directory with peaky weights (varied greedy tokens), a running
engine over it, and the official openai client on a real server."""

import contextlib
from pathlib import Path

import pytest
import torch

from lmforge.tokenizer.files import copy_tokenizer_files
from unit.finetune.helpers import make_tokenizer_dir


def micro_model(vocab_size: int, seed: int = 0):
    from lmforge.model.config import preset_config
    from lmforge.model.transformer import Transformer

    torch.manual_seed(seed)
    return Transformer(preset_config("micro", vocab_size=vocab_size, init_std=0.2)).eval()


def write_micro_model_dir(tmp_path_factory) -> Path:
    """A new model directory: micro_model over a chat tokenizer (make_tokenizer_dir)."""
    from lmforge.model.convert import save_pretrained
    from lmforge.tokenizer.files import TokenizerFiles

    tok = make_tokenizer_dir(tmp_path_factory.mktemp("serve-tok"))
    out = tmp_path_factory.mktemp("serve-model")
    save_pretrained(micro_model(TokenizerFiles.load(tok).vocab_size), out)
    copy_tokenizer_files(tok, out)
    return out


@pytest.fixture(scope="session")
def serve_model_dir(tmp_path_factory) -> Path:
    return write_micro_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def engine(serve_model_dir):
    from lmforge.serve.engine import Engine

    eng = Engine.from_dir(serve_model_dir, device="cpu", max_batch_size=8)
    eng.start()
    yield eng
    eng.shutdown(drain=False)


@pytest.fixture(scope="module")
def openai_server():
    """start(models, **settings): a real uvicorn on 127.0.0.1 serving `models` (ServeSettings'
    [{"name", "path"}]) on a free port, and the official openai client on it; the servers a
    module starts stop when it ends."""
    openai = pytest.importorskip("openai")
    from lmforge.serve.launch import free_port
    from lmforge.serve.server import create_app
    from lmforge.serve.settings import ServeSettings
    from unit.serve.test_serve_uvicorn import running

    with contextlib.ExitStack() as servers:

        def start(models: list[dict], **fields):
            settings = ServeSettings(models=models, port=free_port(), **fields)
            servers.enter_context(running(settings, create_app(settings)))
            return openai.OpenAI(base_url=f"http://127.0.0.1:{settings.port}/v1", api_key="-")

        yield start
