"""Fixtures: a micro chat model directory with peaky weights (varied greedy tokens) and a running
engine over it."""

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


@pytest.fixture(scope="session")
def serve_model_dir(tmp_path_factory) -> Path:
    from lmforge.model.convert import save_pretrained
    from lmforge.tokenizer.files import TokenizerFiles

    tok = make_tokenizer_dir(tmp_path_factory.mktemp("serve-tok"))
    out = tmp_path_factory.mktemp("serve-model")
    save_pretrained(micro_model(TokenizerFiles.load(tok).vocab_size), out)
    copy_tokenizer_files(tok, out)
    return out


@pytest.fixture(scope="module")
def engine(serve_model_dir):
    from lmforge.serve.engine import Engine

    eng = Engine.from_dir(serve_model_dir, device="cpu", max_batch_size=8)
    eng.start()
    yield eng
    eng.shutdown(drain=False)
