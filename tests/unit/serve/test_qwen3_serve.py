"""The serving engine on a qk_norm model (head_dim 24, not n_embd / n_head) and on a mixture of
experts: batched prefill, chunked prefill and decoding steps (serve/causal_step.py) give the
greedy tokens of recomputing the whole prefix."""

from __future__ import annotations

import torch

from lmforge.model.config import preset_config
from lmforge.model.generate import generate
from lmforge.model.moe import moe_layers
from lmforge.model.transformer import Transformer
from lmforge.serve.engine import Engine, SamplingParams, collect
from lmforge.tokenizer.files import TokenizerFiles


def _assert_engine_answers_equal_generate(model: Transformer, files: TokenizerFiles) -> None:
    engine = Engine(model, files, name="m", max_prefill_tokens=4)  # longer prompts: chunked
    prompts = [[(7 * i) % 250 + 3 for i in range(23)], [5, 6, 7], [9, 4, 4, 2, 8, 1]]
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    engine.start()
    try:
        handles = [engine.submit(p, greedy, f"r{i}") for i, p in enumerate(prompts)]
        answers = [collect(h).token_ids for h in handles]
    finally:
        engine.shutdown()
    for prompt, answer in zip(prompts, answers, strict=True):
        recomputed = generate(model, torch.tensor([prompt]), 10, greedy=True, use_cache=False)
        assert answer == recomputed[0, len(prompt) :].tolist()
    assert len({tuple(a) for a in answers}) == 3


def test_engine_chunked_and_batched_answers_equal_generate_with_qk_norm(serve_model_dir):
    files = TokenizerFiles.load(serve_model_dir)
    torch.manual_seed(0)
    cfg = preset_config(
        "micro", vocab_size=files.vocab_size, init_std=0.2, qk_norm=True, head_dim=24
    )
    model = Transformer(cfg).eval()
    with torch.no_grad():  # gains away from 1: a path that skipped a norm would answer otherwise
        for block in model.blocks:
            block.attn.q_norm.weight.uniform_(0.2, 3.0)
            block.attn.k_norm.weight.uniform_(0.2, 3.0)
    _assert_engine_answers_equal_generate(model, files)


def test_engine_chunked_and_batched_answers_equal_generate_with_experts(serve_model_dir):
    """micro-moe: a batch's rows (and a prefill chunk's tokens) route each token on its own, so
    batching and chunking change no expert choice; decisive routers keep ties out of the way."""
    files = TokenizerFiles.load(serve_model_dir)
    torch.manual_seed(0)
    model = Transformer(preset_config("micro-moe", vocab_size=files.vocab_size, init_std=0.2))
    with torch.no_grad():
        for layer in moe_layers(model):
            layer.router.weight.mul_(10.0)
    _assert_engine_answers_equal_generate(model.eval(), files)
