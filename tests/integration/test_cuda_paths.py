"""The CUDA paths issue #18 asks about, with train.compile on: each test runs on "cpu" (`-m slow`
where it compiles) and on "cuda" under `pytest -m gpu` (benchmarks/device/issue18_rest.sh), so
the device run checks exactly what CPU already passes: compiled pretraining that learns, checkpoints
and resumes; compiled SFT and LoRA; compiled KV-cache generation against eager; the serve
engine's continuous batching against generate; compiled decoding (generate(compile="on") and the
engine's compile setting, model/compiled_decode.py) against eager, compiling once; bf16 autocast
(what train.dtype=auto picks on a GPU) against fp32.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from unit.finetune.helpers import make_model_dir, make_tokenizer_dir
from unit.train.helpers import KilledAt, bigram_tokens, make_ctx

from lmforge.model.config import preset_config
from lmforge.model.generate import generate, left_pad
from lmforge.model.transformer import Transformer
from lmforge.runner import run_single
from lmforge.train.checkpoint import latest_checkpoint
from lmforge.train.config import TrainConfig
from lmforge.train.loader import TokenWindows
from lmforge.train.loop import train
from lmforge.train.pretrain import lm_loss

CUDA = pytest.param("cuda", marks=pytest.mark.gpu)
# torch.compile takes 30-90 s per test on a loaded 2-core CPU: those cpu variants are `slow`
DEVICES = [pytest.param("cpu", marks=pytest.mark.slow), CUDA]
TOKENS = bigram_tokens(6000)


def _micro(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(preset_config("micro", vocab_size=32, n_layer=1, **overrides))


def _losses(out) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _pretrain(out, device, wrap=lambda loader: loader, seed=0):
    cfg = TrainConfig(max_steps=12, micro_batch_size=8, seq_len=16, warmup_steps=0, eval_every=0,
                      ckpt_every=4, keep_last=1, lr=1e-2, device=device, compile=True)  # fmt: skip
    ctx = make_ctx(out)
    try:
        return train(_micro(seed), lm_loss, wrap(TokenWindows(TOKENS, 16, 8, seed=0)), cfg, ctx)
    finally:
        ctx.metrics.close()


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_pretraining_learns_checkpoints_and_resumes(tmp_path, device):
    full = _pretrain(tmp_path / "full", device)
    losses = _losses(tmp_path / "full")
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3  # it learns the bigram stream

    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):  # dies during step 7: checkpoint 4 is on disk
        _pretrain(killed, device, wrap=lambda loader: KilledAt(loader, 6))
    assert latest_checkpoint(killed / "checkpoints").name == "step_4"
    resumed = _pretrain(killed, device, seed=1234)  # another init: resume must overwrite it all
    assert resumed.resumed_from == 4 and resumed.step == 12
    # bitwise on CPU; CUDA's atomics in the embedding backward allow rounding differences
    assert _losses(killed) == pytest.approx(losses, abs=1e-4 if device == "cpu" else 2e-2)
    for a, b in zip(full.state_dict.values(), resumed.state_dict.values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5 if device == "cpu" else 1e-2)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A micro chat model dir with peaky weights (varied greedy tokens) and its ChatML tokenizer."""
    root = tmp_path_factory.mktemp("chat")
    return make_model_dir(root / "model", make_tokenizer_dir(root / "tok"), init_std=0.2)


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_finetuning_trains_and_exports(tmp_path, chat_model, device, method):
    data = tmp_path / "chat.jsonl"
    rows = [{"prompt": f"say {w}", "completion": w} for w in ["alpha", "beta", "gamma"] * 8]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sets = [f"train.{k}" for k in ("max_steps=8", "seq_len=32", "micro_batch_size=4",
            "warmup_steps=0", "eval_every=0", "lr=1e-2", f"device={device}", "compile=true")]  # fmt: skip
    sets += ["eval.rouge_examples=1", "eval.max_new_tokens=4", "eval.compare_base=false"]
    values = {"model": chat_model, "data": data, "out": tmp_path / "ft", "method": method}
    result = run_single("finetune", values, overrides=sets)
    assert result.metrics["steps"] == 8
    losses = _losses(tmp_path / "ft")
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert (tmp_path / "ft" / "final" / "model.safetensors").is_file()
    if method == "lora":
        assert (tmp_path / "ft" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.fixture
def exact_fp32():
    """fp32 matmuls without TF32 (a CUDA training run in this process turns it on): greedy
    tokens compared across code paths must not hinge on TF32 rounding near a tie."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.usefixtures("exact_fp32")
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_kv_cache_generation_equals_eager(device):
    eager = _micro(init_std=0.2).to(device).eval()
    compiled = copy.deepcopy(eager)
    # generate() calls model.hidden_states, not forward, so model.compile() (what train.compile
    # does) never reaches decoding; compiling hidden_states asks whether the KV-cache path
    # (prefill, then one token per step at a moving start_pos) is safe to compile
    compiled.hidden_states = torch.compile(compiled.hidden_states, dynamic=True)
    prompt = torch.tensor([[1, 5, 9, 2, 7], [3, 3, 8, 1, 0]], device=device)
    want = generate(eager, prompt, 24, greedy=True, use_cache=False)
    assert torch.equal(generate(eager, prompt, 24, greedy=True), want)
    assert torch.equal(generate(compiled, prompt, 24, greedy=True), want)
    assert len(set(want[0, 5:].tolist())) > 2  # the model is not degenerate


@pytest.mark.usefixtures("exact_fp32")
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_engine_continuous_batching_equals_generate(chat_model, device):
    from lmforge.serve.engine import Engine, SamplingParams, collect

    engine = Engine.from_dir(chat_model, device=device, max_batch_size=4)
    engine.start()
    try:
        prompts = [engine.files.encode(p) for p in ("say alpha", "What is", "def f(x):", "b")]
        lengths = [20, 9, 15, 12]
        params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths]
        handles = [engine.submit(ids, p, f"r{i}") for i, (ids, p) in enumerate(zip(prompts, params, strict=True))]  # fmt: skip
        results = [collect(h).token_ids for h in handles]
    finally:
        engine.shutdown(drain=False)
    model = engine.model
    on = next(model.parameters()).device
    assert on.type == device
    for ids, n, got in zip(prompts, lengths, results, strict=True):
        alone = generate(model, torch.tensor([ids], device=on), n, greedy=True)
        assert got == alone[0, len(ids) :].tolist()
    assert len({tuple(r) for r in results}) > 1


@pytest.mark.usefixtures("exact_fp32")
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_decoding_equals_eager_and_compiles_once(device):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = _micro(init_std=0.2).to(device).eval()
    ids, mask = left_pad([[1, 5, 9, 2, 7], [3, 3, 8], [6, 1, 4, 4]], device=device)
    want = generate(model, ids, 40, pad_mask=mask, greedy=True)
    assert torch.equal(generate(model, ids, 40, pad_mask=mask, greedy=True, compile="on"), want)
    assert counters["frames"]["ok"] == 1  # 39 steps over a growing cache: one graph
    assert len(set(want[0, 5:].tolist())) > 2  # the model is not degenerate


@pytest.mark.usefixtures("exact_fp32")
@pytest.mark.parametrize("device", DEVICES)
def test_engine_compiled_decoding_equals_generate(chat_model, device):
    from lmforge.serve.engine import Engine, SamplingParams, collect

    engine = Engine.from_dir(chat_model, device=device, max_batch_size=4, compile="on")
    engine.start()  # compiles the step (one row, several) before serving
    try:
        prompts = [engine.files.encode(p) for p in ("say alpha", "What is", "def f(x):", "b")]
        lengths = [20, 9, 70, 12]  # one answer outgrows the first 64 storage columns
        params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths]
        handles = [engine.submit(ids, p, f"r{i}") for i, (ids, p) in enumerate(zip(prompts, params, strict=True))]  # fmt: skip
        results = [collect(h).token_ids for h in handles]
    finally:
        engine.shutdown(drain=False)
    on = next(engine.model.parameters()).device
    assert on.type == device and engine.compiled_decode
    for ids, n, got in zip(prompts, lengths, results, strict=True):
        alone = generate(engine.model, torch.tensor([ids], device=on), n, greedy=True)
        assert got == alone[0, len(ids) :].tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_compiled_loss_is_close_to_fp32(device):
    model = _micro().to(device)
    batch = torch.from_numpy(TOKENS[: 8 * 17].astype("int64")).view(8, 17).to(device)
    x, y = batch[:, :-1], batch[:, 1:]
    fp32 = model(x, labels=y)
    compiled = copy.deepcopy(model)
    compiled.compile()
    with torch.autocast(device, dtype=torch.bfloat16):
        logits = compiled(x)
        loss = compiled(x, labels=y)
    assert logits.dtype == torch.bfloat16  # autocast took effect inside the compiled graph
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(loss.item() - fp32.item()) < 2e-2 * fp32.item()
    loss.backward()
    grads = [p.grad for p in compiled.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
