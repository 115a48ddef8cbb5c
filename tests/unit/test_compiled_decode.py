"""Compiled decoding (model/compiled_decode.py) against the eager path: generate(), the eval
scorer and the serving engine give the same greedy tokens, decode_step's logits match the eager
step's, and a generation compiles its step once, not once per token.

Most tests compile with backend="aot_eager" (dynamo's graph capture and AOT autograd, no code
generation: seconds, not the inductor's tens of seconds on this 2-core CPU); recompiles are
counted by dynamo whatever the backend. One test runs the default inductor backend end to end.
"""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch
from torch._dynamo.utils import counters

from lmforge.config import hashed_dump
from lmforge.errors import ConfigError
from lmforge.model import compiled_decode
from lmforge.model.compiled_decode import (
    FixedShapeSteps,
    decode_capacity,
    use_compiled_decode,
)
from lmforge.model.config import preset_config
from lmforge.model.generate import KVCache, generate, left_pad
from lmforge.model.transformer import Transformer

PROMPTS = [[1, 5, 9, 2, 7, 4], [3, 3, 8], [30, 2, 2, 11, 6]]


@pytest.fixture
def aot_eager(monkeypatch):
    """Compile with aot_eager, from a clean dynamo cache and zeroed counters."""
    monkeypatch.setattr(compiled_decode, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    cfg = preset_config("micro", vocab_size=32, n_layer=2, init_std=0.2, **overrides)
    return Transformer(cfg).eval()


def _frames_compiled() -> int:
    return counters["frames"]["ok"]


VARIANTS = {
    "rope-gqa": {},
    "learned-pos-mha": {"pos": "learned", "n_kv_head": 4, "norm": "layernorm", "bias": True},
    "sliding-window": {"sliding_window": 6},
}


@pytest.mark.usefixtures("aot_eager")
@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_step_logits_match_the_eager_step(variant):
    model = _model(**VARIANTS[variant])
    ids, mask = left_pad(PROMPTS)
    B, T = ids.shape
    steps = 20
    eager_cache = KVCache.for_model(model, B, T + steps)
    static_cache = KVCache.for_model(model, B, decode_capacity(T + steps, 128))
    with torch.no_grad():
        h = model.hidden_states(ids, kv_cache=eager_cache, pad_mask=mask)
        model.hidden_states(ids, kv_cache=static_cache, pad_mask=mask)
        fixed = FixedShapeSteps(model, static_cache, mask, T)
        nxt = model.lm_head(h[:, -1]).argmax(-1)
        for i in range(steps - 1):
            mask = torch.cat([mask, torch.ones((B, 1), dtype=torch.long)], dim=1)
            h = model.hidden_states(nxt[:, None], kv_cache=eager_cache, start_pos=T + i,
                                    pad_mask=mask)  # fmt: skip
            want = model.lm_head(h[:, -1])
            got = fixed(nxt[:, None])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            nxt = want.argmax(-1)
    assert _frames_compiled() == 1


@pytest.mark.usefixtures("aot_eager")
def test_generate_compiled_gives_the_eager_greedy_tokens_with_one_compile_over_40_tokens():
    model = _model()
    ids, mask = left_pad(PROMPTS)
    want = generate(model, ids, 40, pad_mask=mask, greedy=True)
    got = generate(model, ids, 40, pad_mask=mask, greedy=True, compile="on")
    assert torch.equal(got, want)
    assert len(set(want[0, ids.size(1) :].tolist())) > 2  # the model is not degenerate
    # 39 decoding steps, keys growing from 7 to 45 positions: one graph
    assert _frames_compiled() == 1
    assert counters["stats"]["unique_graphs"] == 1
    # more prompts, unpadded and shorter, in the same capacity bucket: no recompile
    same = torch.tensor([[4, 8, 15], [16, 23, 12], [1, 2, 3]])
    _assert_same_greedy(model, same, 30)
    assert _frames_compiled() == 1
    # another batch size: one recompile, to a graph dynamic in it; the next size reuses that
    _assert_same_greedy(model, same[:2], 30)
    assert _frames_compiled() == 2
    _assert_same_greedy(model, torch.cat([same, same[:2]]), 30)
    assert _frames_compiled() == 2


def _assert_same_greedy(model: Transformer, ids: torch.Tensor, n: int) -> None:
    want = generate(model, ids, n, greedy=True)
    assert torch.equal(generate(model, ids, n, greedy=True, compile="on"), want)


@pytest.mark.usefixtures("aot_eager")
@pytest.mark.parametrize("variant", ["rope-gqa", "learned-pos-mha", "sliding-window"])
def test_generate_compiled_fills_a_block_size_that_is_no_power_of_two(variant):
    """prompt + new tokens = block_size 40: the cache is block_size wide (not the next power of
    two) and the last positions (the rotary/learned tables' last rows) decode as eagerly."""
    model = _model(block_size=40, **VARIANTS[variant])
    ids, mask = left_pad(PROMPTS)
    n = 40 - ids.size(1)
    want = generate(model, ids, n, pad_mask=mask, greedy=True)
    assert torch.equal(generate(model, ids, n, pad_mask=mask, greedy=True, compile="on"), want)


@pytest.mark.usefixtures("aot_eager")
def test_generate_compiled_samples_like_eager_with_stops_and_penalty():
    model = _model(seed=1)
    ids, mask = left_pad(PROMPTS)
    kw = dict(pad_mask=mask, temperature=0.9, top_k=10, repetition_penalty=1.3, stop_tokens=[3])
    want = generate(model, ids, 25, generator=torch.Generator().manual_seed(7), **kw)
    got = generate(model, ids, 25, generator=torch.Generator().manual_seed(7), compile="on", **kw)
    assert torch.equal(got, want)


@pytest.mark.usefixtures("aot_eager")
def test_each_model_compiles_under_its_own_recompile_limit_and_is_freed_with_it():
    """dynamo counts recompiles per code object: had models shared one, the second
    architecture here would hit the limit (1 for this test; 8 by default) and decode eagerly."""
    ids = torch.tensor([[1, 2, 3]])
    with torch._dynamo.config.patch(recompile_limit=1):
        for n_head in (4, 2):  # two architectures
            _assert_same_greedy(_model(n_head=n_head, n_kv_head=n_head), ids, 6)
    assert _frames_compiled() == 2
    model = _model()
    _assert_same_greedy(model, ids, 6)
    freed = weakref.ref(model)
    del model
    gc.collect()
    assert freed() is None and not compiled_decode._STEPS  # no compiled step outlives its model


def test_compile_modes_and_capacity():
    assert use_compiled_decode("on", "cpu") and not use_compiled_decode("off", "cuda")
    assert not use_compiled_decode("auto", "cpu") and use_compiled_decode("auto", "cuda:0")
    with pytest.raises(ConfigError, match="compile must be off, on or auto, got 'yes'"):
        use_compiled_decode("yes", "cpu")
    assert [decode_capacity(n, 1024) for n in (1, 64, 65, 200, 1000)] == [64, 64, 128, 256, 1024]
    assert decode_capacity(100, 96) == 100  # past block_size generate() refuses; never shorter
    assert decode_capacity(70, 96) == 96


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_rejects_an_unknown_compile_mode(use_cache):
    with pytest.raises(ConfigError, match="compile must be"):
        generate(
            _model(), torch.tensor([[1, 2]]), 3, greedy=True, compile="fast", use_cache=use_cache
        )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from unit.finetune.helpers import make_model_dir, make_tokenizer_dir

    root = tmp_path_factory.mktemp("compiled")
    return make_model_dir(root / "model", make_tokenizer_dir(root / "tok"), init_std=0.2)


@pytest.mark.usefixtures("aot_eager")
def test_eval_generation_setting_compile_reaches_generate(model_dir):
    from lmforge.evals.lm import EvalModel, GenerationSettings

    lm = EvalModel.load(model_dir)
    prompts = ["def f(x):", "What is", "b"]
    eager = lm.generate_batch(prompts, GenerationSettings(max_new_tokens=12))
    compiled = lm.generate_batch(prompts, GenerationSettings(max_new_tokens=12, compile="on"))
    assert compiled == eager
    assert _frames_compiled() == 1
    # a speed switch, not a result: turning it on does not rerun a cached eval stage
    assert hashed_dump(GenerationSettings(compile="on")) == hashed_dump(GenerationSettings())


@pytest.mark.usefixtures("aot_eager")
def test_serve_engine_compiled_answers_equal_generate_with_few_recompiles(model_dir):
    from lmforge.serve.engine import Engine, SamplingParams, collect

    engine = Engine.from_dir(model_dir, device="cpu", max_batch_size=4, compile="on")
    assert engine.compiled_decode
    texts = ["say alpha", "What is", "def f(x):", "b", "os.path.join", "Paris"]
    prompts = [engine.files.encode(t) for t in texts]
    lengths = [30, 9, 21, 14, 70, 5]  # rows leave at different steps; one outgrows 64 columns
    engine.start()  # compiles the step for one row and for several before serving
    assert _frames_compiled() == 2
    try:
        handles = []
        for i, (ids, n) in enumerate(zip(prompts, lengths, strict=True)):
            params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
            handles.append(engine.submit(ids, params, f"r{i}"))
            if i % 2 == 0:  # later requests join a batch that is already decoding
                next(iter(handles[-1]))
        results = [collect(h).token_ids for h in handles[1::2]]
    finally:
        engine.shutdown(drain=False)
    for i, got in zip(range(1, 6, 2), results, strict=True):
        alone = generate(engine.model, torch.tensor([prompts[i]]), lengths[i], greedy=True)
        assert got == alone[0, len(prompts[i]) :].tolist()
    # rows joined and left (1 to 4) and the storage grew past 64 columns: no recompile
    assert _frames_compiled() == 2


def test_engine_compiles_outside_its_lock_and_a_shutdown_meanwhile_stops_the_start(
    model_dir, monkeypatch
):
    from lmforge.serve import engine as engine_module
    from lmforge.serve.engine import Engine, EngineClosed, SamplingParams

    compiling, finish = threading.Event(), threading.Event()

    def slow_warm_up(model, device):  # stands in for the compile: tens of seconds on a CPU
        compiling.set()
        finish.wait(30)

    monkeypatch.setattr(engine_module, "warm_up_compiled", slow_warm_up)
    engine = Engine.from_dir(model_dir, device="cpu", compile="on")
    failed: list[BaseException] = []
    starter = threading.Thread(target=lambda: _catching(engine.start, failed))
    starter.start()
    try:
        assert compiling.wait(30)
        asker = threading.Thread(target=engine.stats)
        asker.start()
        asker.join(5)
        assert not asker.is_alive()  # stats() did not wait for the compile
        handle = engine.submit([1, 2], SamplingParams(max_tokens=2), "r")  # queued meanwhile
        engine.shutdown(drain=False)
    finally:
        finish.set()
        starter.join(30)
    assert handle.finished and isinstance(failed[0], EngineClosed)  # no loop after a shutdown


def _catching(fn, caught: list[BaseException]) -> None:
    try:
        fn()
    except Exception as exc:
        caught.append(exc)


def test_engine_names_the_compile_setting_when_the_compile_fails(model_dir, monkeypatch):
    from lmforge.serve.engine import Engine

    def no_compiler(gm, example_inputs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(compiled_decode, "BACKEND", no_compiler)
    torch._dynamo.reset()
    engine = Engine.from_dir(model_dir, device="cpu", compile="on")
    with pytest.raises(
        ConfigError, match=r"failed; serve with compile off [\s\S]*no C\+\+ compiler"
    ):
        engine.start()
    engine.shutdown()
    torch._dynamo.reset()


@pytest.mark.usefixtures("aot_eager")
def test_a_kept_int4_checkpoint_compiles_to_one_graph(tmp_path):
    """Layers in torch's int4 kernel layout read their layout at load, not in forward, where
    int4pack_layout's cache and device context broke the graph at every layer."""
    from lmforge.compress.quantize import quantize_dir
    from lmforge.model.convert import load_pretrained
    from lmforge.model.quant import QuantLinear
    from unit.evals.helpers import make_model_dir

    quantize_dir(make_model_dir(tmp_path / "fp32", preset="micro"), tmp_path / "int4", "int4", 32)
    model = load_pretrained(tmp_path / "int4").eval()
    if not any(isinstance(m, QuantLinear) and m.kernel_packed for m in model.modules()):
        pytest.skip("this torch has no CPU int4 kernel layout: nothing kernel-packed to compile")
    generate(model, torch.tensor([[1, 2, 3, 4]]), 8, greedy=True, compile="on")
    assert _frames_compiled() == 1 and not counters["graph_break"]


def test_serve_settings_compile_is_validated():
    from pydantic import ValidationError

    from lmforge.serve.settings import ServeSettings

    models = [{"name": "m", "path": "."}]
    assert ServeSettings(models=models).compile == "off"
    assert ServeSettings(models=models, compile="auto").compile == "auto"
    with pytest.raises(ValidationError, match="compile"):
        ServeSettings(models=models, compile="always")


@pytest.mark.slow  # 35 s on the loaded 2-core CPU, most of it the inductor's C++ compile
def test_generate_compiled_with_inductor_equals_eager():
    """The default backend (inductor: C++ code generated for this CPU), one generation."""
    torch._dynamo.reset()
    model = _model(seed=2)
    ids, mask = left_pad(PROMPTS)
    want = generate(model, ids, 24, pad_mask=mask, greedy=True)
    assert torch.equal(generate(model, ids, 24, pad_mask=mask, greedy=True, compile="on"), want)


def _copied(cache):
    from lmforge.serve.batch_cache import BatchCache

    return BatchCache(cache.k.clone(), cache.v.clone(), cache.pad_mask.clone(), cache.limit)


@pytest.mark.usefixtures("aot_eager")
@pytest.mark.parametrize("variant", VARIANTS)
def test_engine_compiled_pass_logits_match_eager_as_rows_join_leave_and_storage_grows(variant):
    """decode_pass(compiled=True) against the eager pass on twin batch caches: left-padded rows,
    a row leaving (the storage's start moves off 0), a longer row joining (the batch shifts
    right), and the storage growing past its first GROW columns, with and without a window."""
    from lmforge.serve.causal_step import decode_pass, prefill_pass

    model = _model(**VARIANTS[variant])
    with torch.inference_mode():
        eager, logits = prefill_pass(model, PROMPTS, torch.device("cpu"))
        compiled = _copied(eager)
        first_capacity = eager.capacity
        for step in range(75):
            if step == 10:  # the longest row leaves: all-padding columns are trimmed by start
                for c in (eager, compiled):
                    c.keep([1, 2])
                logits = logits[1:]
                assert compiled.start > 0
            if step == 20:  # a joiner longer than the batch so far: everyone shifts right
                joiner, first = prefill_pass(model, [list(range(1, 31))], torch.device("cpu"))
                eager.merge([joiner])
                compiled.merge([_copied(joiner)])
                logits = torch.cat([logits, first])
            tokens = logits.argmax(-1).tolist()
            logits = decode_pass(model, eager, tokens, torch.device("cpu"))
            got = decode_pass(model, compiled, tokens, torch.device("cpu"), compiled=True)
            torch.testing.assert_close(got, logits, atol=1e-5, rtol=1e-5)
    assert eager.capacity > first_capacity  # the storage grew on the way
    assert torch.equal(compiled.pad_mask, eager.pad_mask)
