"""LoRA adapters in the engine (serve/multi_lora.py, serve/lora_adapters.py): rows of two adapters
and the base in one batch each answer as the merged model (or the base) alone, token for token,
in whole and chunked prefills; the prefix cache never hands one adapter's keys/values to another;
HF PEFT's separate q/k/v adapters are exact; what cannot be served exactly is refused at start-up,
naming the adapter."""

from __future__ import annotations

import copy
import gc
import json
import shutil
import time
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.errors import ConfigError, InputError
from lmforge.finetune.peft_adapter import peft_module_pairs
from lmforge.model.convert import load_pretrained
from lmforge.serve.engine import Engine, SamplingParams, collect
from lmforge.serve.lora_adapters import adapter_base, read_adapter
from lmforge.serve.multi_lora import MultiLoRALinear
from lmforge.serve.prefix_cache import BLOCK_TOKENS
from lmforge.tokenizer.files import TokenizerFiles
from unit.finetune.helpers import make_model_dir, make_tokenizer_dir
from unit.serve.lora_helpers import two_adapters

PROMPTS = [
    [(5 * i + 7) % 250 + 3 for i in range(3 * BLOCK_TOKENS + 2)],  # three blocks and more
    [11, 12, 13],
    [(3 * i + 1) % 200 + 9 for i in range(21)],
]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def lora_dirs(serve_model_dir, tmp_path_factory):
    return two_adapters(serve_model_dir, tmp_path_factory)


def _engine(model_dir, adapters=(), **kw) -> Engine:
    engine = Engine.from_dir(model_dir, device="cpu", max_batch_size=16, **kw)
    engine.attach_adapters([read_adapter(engine.model, name, path) for name, path in adapters])
    engine.start()
    return engine


def _assert_same(got, want) -> None:
    """The same tokens, their logprobs equal to float rounding (another summation order)."""
    assert got[0] == want[0]
    assert got[1] == pytest.approx(want[1], abs=1e-4)


def _answer(engine: Engine, prompt, rid: str, adapter=None):
    out = collect(engine.submit(prompt, GREEDY, rid, adapter=adapter))
    return out.token_ids, out.logprobs


@pytest.fixture(scope="module")
def alone(serve_model_dir, lora_dirs):
    """Each prompt's greedy answer from the base and from each merged model, served alone."""
    answers = {}
    for name, model_dir in [(None, serve_model_dir)] + [(n, m) for n, (_, m) in lora_dirs.items()]:
        engine = _engine(model_dir)
        answers[name] = [_answer(engine, p, f"{name}-{i}") for i, p in enumerate(PROMPTS)]
        engine.shutdown()
    return answers


@pytest.mark.parametrize("max_prefill_tokens", [2048, 16])  # 16: the long prompt is chunked
def test_a_mixed_batch_answers_as_each_merged_model_alone(
    serve_model_dir, lora_dirs, alone, max_prefill_tokens
):
    engine = _engine(serve_model_dir, [(n, a) for n, (a, _) in lora_dirs.items()],
                     max_prefill_tokens=max_prefill_tokens)  # fmt: skip
    try:
        handles = [
            (name, i, engine.submit(p, GREEDY, f"{name}-{i}", adapter=name))
            for i, p in enumerate(PROMPTS)
            for name in (None, "a1", "a2")
        ]  # all queued before the loop admits them: one batch of base and adapter rows
        for name, i, handle in handles:
            out = collect(handle)
            _assert_same((out.token_ids, out.logprobs), alone[name][i])
    finally:
        engine.shutdown()
    assert alone["a1"] != alone[None] and alone["a2"] != alone["a1"]  # the adapters matter


def test_the_prefix_cache_never_gives_one_adapters_blocks_to_another(
    serve_model_dir, lora_dirs, alone
):
    engine = _engine(serve_model_dir, [(n, a) for n, (a, _) in lora_dirs.items()],
                     prefix_cache_mb=8)  # fmt: skip
    try:
        long = PROMPTS[0]
        for turn, name in enumerate(["a1", "a2", None, "a1"]):
            hits = engine.stats().prefix.hits
            _assert_same(_answer(engine, long, f"t{turn}", name), alone[name][0])
            # only a1's second turn finds blocks: a2 and the base each prefill in full
            assert engine.stats().prefix.hits - hits == (1 if turn == 3 else 0), name
    finally:
        engine.shutdown()


def test_separate_q_k_v_adapters_of_hf_peft_are_exact(serve_model_dir, lora_dirs, tmp_path):
    """HF PEFT trains q_proj, k_proj and v_proj each with its own A: the fused qkv's update is
    then the parts' B A stacked, which the engine must reproduce exactly."""
    adapter = tmp_path / "hf"
    shutil.copytree(lora_dirs["a1"][0], adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    torch.manual_seed(5)
    for key in [k for k in tensors if ".k_proj.lora_A" in k or ".v_proj.lora_A" in k]:
        tensors[key] = torch.randn_like(tensors[key]) * 0.3
    save_file(tensors, adapter / "adapter_model.safetensors")
    config = json.loads((adapter / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]

    reference = load_pretrained(serve_model_dir, device="cpu", dtype=torch.float32)
    with torch.no_grad():  # each HF module's own B A, concatenated as our fused weights are
        for name, parts in peft_module_pairs(reference, tensors).items():
            delta = torch.cat([b @ a for a, b in parts]) * scaling
            reference.get_submodule(name).weight += delta
    files = TokenizerFiles.load(serve_model_dir)
    want_engine = Engine(reference, files, name="reference")
    want_engine.start()
    engine = _engine(serve_model_dir, [("hf", adapter)])
    try:
        qkv = engine.model.get_submodule("blocks.0.attn.qkv")
        assert isinstance(qkv, MultiLoRALinear) and qkv.lora_a.shape[0] == 3 * config["r"]
        for i, prompt in enumerate(PROMPTS):
            got, want = (
                _answer(engine, prompt, f"g{i}", "hf"),
                _answer(want_engine, prompt, f"w{i}"),
            )
            assert got[0] == want[0]
            assert got[1] == pytest.approx(want[1], abs=1e-4)
    finally:
        engine.shutdown()
        want_engine.shutdown()


def test_a_hugging_face_peft_adapter_serves_as_peft_computes_it(serve_model_dir, tmp_path):
    """PEFT's own model is the reference: its default Llama targets (q_proj, v_proj: k of our
    fused qkv unadapted), each with its own A, rslora's alpha / sqrt(r); a base row beside it
    stays the base exactly."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lmforge.serve.multi_lora import attach_adapters

    hf = transformers.AutoModelForCausalLM.from_pretrained(serve_model_dir).eval()
    torch.manual_seed(6)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             use_rslora=True, init_lora_weights=False)  # fmt: skip
    peft_model = peft.get_peft_model(hf, config).eval()
    peft_model.save_pretrained(tmp_path / "hf")
    model = load_pretrained(serve_model_dir, device="cpu", dtype=torch.float32).eval()
    ids = torch.tensor([PROMPTS[2], PROMPTS[0][:21]])
    with torch.no_grad():
        base = model(ids)
        slots = attach_adapters(model, {"hf": read_adapter(model, "hf", tmp_path / "hf").updates})
        slots.select(["hf", None])
        got = model(ids)
        want = peft_model(ids).logits
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=0)
    assert (want[0] - base[0]).abs().max() > 1e-2  # the adapter matters
    assert torch.equal(got[1], base[1])  # a base row adds exact zeros


# -- what start-up refuses ------------------------------------------------------------------------


def _edited(src, tmp_path, **config_changes):
    out = tmp_path / "edited"
    shutil.copytree(src, out)
    config = json.loads((out / "adapter_config.json").read_text())
    config.update(config_changes)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"r": 8}, "do not have its adapter_config.json's rank r=8"),
        ({"use_dora": True}, "use_dora"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "lora_only"}, "trained biases"),
    ],
)
def test_an_adapter_the_base_cannot_run_exactly_is_refused_by_name(
    serve_model_dir, lora_dirs, tmp_path, changes, message
):
    model = load_pretrained(serve_model_dir, device="cpu")
    with pytest.raises(InputError, match=message) as err:
        read_adapter(model, "bad", _edited(lora_dirs["a1"][0], tmp_path, **changes))
    assert "LoRA adapter 'bad'" in str(err.value)


def test_an_adapter_of_another_size_or_vocabulary_is_refused(serve_model_dir, lora_dirs, tmp_path):
    tok = make_tokenizer_dir(tmp_path / "tok")  # the served model's tokenizer, trained alike
    wide = make_model_dir(tmp_path / "wide", tok, n_embd=96, init_std=0.2)
    with pytest.raises(InputError, match="takes 96 inputs on this base but the adapter's lora_A "
                       "has 64: it was trained on another base"):  # fmt: skip
        read_adapter(load_pretrained(wide, device="cpu"), "small", lora_dirs["a1"][0])
    other_vocab = tmp_path / "vocab"
    shutil.copytree(lora_dirs["a1"][0], other_vocab)
    bigger = make_tokenizer_dir(tmp_path / "tok400", vocab_size=400)
    shutil.copy(bigger / "tokenizer.json", other_vocab / "tokenizer.json")
    with pytest.raises(InputError, match="another vocabulary"):
        read_adapter(load_pretrained(serve_model_dir, device="cpu"), "v", other_vocab)
    broken = tmp_path / "broken"
    shutil.copytree(lora_dirs["a1"][0], broken)
    (broken / "tokenizer_config.json").write_text("{chat_template: nope", encoding="utf-8")
    with pytest.raises(InputError, match=r"LoRA adapter 'b' .*tokenizer_config\.json is not valid"):
        read_adapter(load_pretrained(serve_model_dir, device="cpu"), "b", broken)
    with pytest.raises(InputError, match=r"adapter_config\.json is missing"):
        read_adapter(load_pretrained(serve_model_dir, device="cpu"), "none", tmp_path)


def test_an_adapter_attaches_to_the_base_it_names_or_the_only_one(lora_dirs, serve_model_dir):
    a1 = lora_dirs["a1"][0]  # its adapter_config names serve_model_dir
    assert adapter_base("x", a1, None, {"other": a1.parent, "base": serve_model_dir}) == "base"
    assert adapter_base("x", a1, None, {"solo": a1.parent}) == "solo"
    assert adapter_base("x", a1, "other", {"other": a1.parent, "base": a1}) == "other"
    with pytest.raises(
        ConfigError, match=r"none of the served models \(p, q\); name its base: --lora-modules"
    ):
        adapter_base("x", a1, None, {"p": a1.parent, "q": a1})
    with pytest.raises(ConfigError, match="base_model_name 'nope' is not a served model"):
        adapter_base("x", a1, "nope", {"p": a1.parent})


def test_finding_an_adapters_base_reads_its_config_as_loading_it_does(lora_dirs, tmp_path):
    """adapter_base reads adapter_config.json through finetune/peft_adapter's one reader: the
    same refusals, naming the adapter, before any weight is read."""
    bases = {"solo": tmp_path}
    with pytest.raises(InputError, match=r"LoRA adapter 'x' .*adapter_config.json is missing"):
        adapter_base("x", tmp_path, None, bases)
    (tmp_path / "adapter_config.json").write_text("{", encoding="utf-8")
    with pytest.raises(InputError, match=r"LoRA adapter 'x' .*is not valid JSON"):
        adapter_base("x", tmp_path, None, bases)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "IA3"}', encoding="utf-8")
    with pytest.raises(InputError, match=r"no r / lora_alpha: not a LoRA adapter config"):
        adapter_base("x", tmp_path, None, bases)


def test_a_compiled_decoding_step_is_refused_with_adapters(serve_model_dir, lora_dirs):
    engine = Engine.from_dir(serve_model_dir, device="cpu", compile="on")
    adapter = read_adapter(engine.model, "a1", lora_dirs["a1"][0])
    refusal = r"LoRA adapters run outside the compiled decoding step; serve them with --compile off"
    with pytest.raises(ConfigError, match=refusal):
        engine.attach_adapters([adapter])
    with pytest.raises(ConfigError, match=refusal):  # runtime loading: the same refusal
        engine.load_adapter(adapter)
    assert engine._lora_keys == {}  # refused before any bookkeeping


def test_a_request_for_an_adapter_the_engine_lacks_is_refused(engine):
    with pytest.raises(InputError, match="serves no LoRA adapter 'ghost'"):
        engine.submit([1, 2], GREEDY, "ghost", adapter="ghost")


def test_a_kept_quantized_base_linear_is_refused(serve_model_dir, lora_dirs):
    from lmforge.finetune.lora import replace_module
    from lmforge.model.quant import QuantLinear
    from lmforge.serve.multi_lora import attach_adapters

    model = load_pretrained(serve_model_dir, device="cpu")
    update = read_adapter(model, "a1", lora_dirs["a1"][0])
    qkv = model.get_submodule("blocks.0.attn.qkv")
    replace_module(model, "blocks.0.attn.qkv", QuantLinear.from_linear(qkv, "int8", 32))
    with pytest.raises(
        ConfigError,
        match=r"blocks\.0\.attn\.qkv is a QuantLinear, not a plain linear layer.* unquantized",
    ):
        attach_adapters(model, {"a1": update.updates})


def test_each_row_gets_its_own_update_on_2d_and_3d_inputs():
    """A linear fed last states (B, in), as a head is, or sequences (B, T, in): row i adds its
    adapter's scaled B A x and nothing else; a base row adds nothing."""
    from lmforge.serve.multi_lora import attach_adapters

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    updates = {
        "x": {"0": (torch.randn(2, 6), torch.randn(5, 2))},  # rank 2: padded to 3
        "y": {"0": (torch.randn(3, 6), torch.randn(5, 3))},
    }
    base = copy.deepcopy(model[0])
    slots = attach_adapters(model, updates)
    names = ["y", None, "x", "y"]
    slots.select(names)
    for shape in ((4, 6), (4, 3, 6)):
        x = torch.randn(*shape)
        want = base(x).clone()
        for i, name in enumerate(names):
            if name is not None:
                a, b = updates[name]["0"]
                want[i] += x[i] @ a.T @ b.T
        torch.testing.assert_close(model(x), want)


# -- loading and unloading while running ---------------------------------------------------------


def test_adapters_load_and_unload_while_requests_run(serve_model_dir, lora_dirs, alone, tmp_path):
    engine = _engine(serve_model_dir, prefix_cache_mb=8)  # starts with no adapter
    try:
        slow = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        running = engine.submit(PROMPTS[1], slow, "running")  # on the base throughout
        engine.load_adapter(read_adapter(engine.model, "a1", lora_dirs["a1"][0]))
        _assert_same(_answer(engine, PROMPTS[0], "l1", "a1"), alone["a1"][0])
        engine.load_adapter(read_adapter(engine.model, "a2", lora_dirs["a2"][0]))
        _assert_same(_answer(engine, PROMPTS[2], "l2", "a2"), alone["a2"][2])
        with pytest.raises(InputError, match="already serves 'a1'"):
            engine.load_adapter(read_adapter(engine.model, "a1", lora_dirs["a1"][0]))

        busy = engine.submit(PROMPTS[0], slow, "busy", adapter="a1")
        with pytest.raises(InputError, match="'a1' has 1 requests waiting or running"):
            engine.unload_adapter("a1")
        collect(busy)
        engine.unload_adapter("a1")
        with pytest.raises(InputError, match="serves no LoRA adapter 'a1'"):
            engine.submit(PROMPTS[0], GREEDY, "gone", adapter="a1")
        _assert_same(_answer(engine, PROMPTS[2], "l3", "a2"), alone["a2"][2])  # slots moved

        # a1's name again with a2's weights: a1's cached blocks of PROMPTS[0] must not serve it
        engine.load_adapter(read_adapter(engine.model, "a1", lora_dirs["a2"][0]))
        _assert_same(_answer(engine, PROMPTS[0], "l4", "a1"), alone["a2"][0])
        assert collect(running).finish_reason == "length"
        for name in ("a1", "a2"):
            engine.unload_adapter(name)
        assert not any(isinstance(m, MultiLoRALinear) for m in engine.model.modules())
        _assert_same(_answer(engine, PROMPTS[2], "l5"), alone[None][2])
    finally:
        engine.shutdown()


def test_an_unloaded_adapters_weights_are_freed(serve_model_dir, lora_dirs):
    engine = _engine(serve_model_dir)
    try:
        for _ in range(2):  # loaded again under its name: nothing of the first load is kept
            engine.load_adapter(read_adapter(engine.model, "a1", lora_dirs["a1"][0]))
            _answer(engine, PROMPTS[1], "r", "a1")  # its rows ran: masks were built
            stack = weakref.ref(engine.model.get_submodule("blocks.0.attn.qkv").lora_a)
            engine.unload_adapter("a1")
            gc.collect()
            assert stack() is None
            assert engine._lora_keys == {} and engine._lora == {}
    finally:
        engine.shutdown()


def test_an_adapter_file_rewritten_in_place_leaves_the_read_adapter_whole(
    serve_model_dir, lora_dirs, tmp_path
):
    """A trainer saving again into a served adapter's directory truncates the file: the weights
    read must not be pages of it (a mapped file's pages vanish: SIGBUS, the server dies)."""
    adapter = tmp_path / "a"
    shutil.copytree(lora_dirs["a1"][0], adapter)
    model = load_pretrained(serve_model_dir, device="cpu")
    update = read_adapter(model, "a", adapter)
    key = update.key
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    assert update.key == key  # reads every A and B again


def _held_bytes(engine: Engine) -> int:
    """Bytes of every distinct storage behind the stacks and the engine's own adapter record."""
    tensors = [t for m in engine.model.modules() if isinstance(m, MultiLoRALinear)
               for t in (m.lora_a, m.lora_b)]  # fmt: skip
    tensors += [t for updates in engine._lora.values() for pair in updates.values() for t in pair]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def test_the_engine_holds_each_adapter_once(serve_model_dir, lora_dirs):
    """N adapters of one rank hold N adapters' bytes: the stacks, and no float32 copy beside
    them to rebuild the stacks from (the record of each is views into the stacks)."""
    engine = Engine.from_dir(serve_model_dir, device="cpu", max_batch_size=4)
    update = read_adapter(engine.model, "a1", lora_dirs["a1"][0])
    one = sum(a.numel() + b.numel() for a, b in update.updates.values()) * 4  # float32
    engine.attach_adapters([update])
    engine.start()
    try:
        assert _held_bytes(engine) == one
        engine.load_adapter(read_adapter(engine.model, "b1", lora_dirs["a1"][0]))
        assert _held_bytes(engine) == 2 * one
        engine.unload_adapter("a1")
        assert _held_bytes(engine) == one
        _answer(engine, PROMPTS[1], "b1", "b1")  # rebuilt from the views: still a1's weights
        assert engine._lora["b1"].keys() == update.updates.keys()
        for module, (a, b) in engine._lora["b1"].items():
            assert torch.equal(a, update.updates[module][0])
            assert torch.equal(b, update.updates[module][1])
    finally:
        engine.shutdown()


def test_an_adapter_loaded_before_start_is_installed_at_once(serve_model_dir, lora_dirs, alone):
    engine = Engine.from_dir(serve_model_dir, device="cpu", max_batch_size=4)
    update = read_adapter(engine.model, "a1", lora_dirs["a1"][0])
    t0 = time.perf_counter()
    engine.load_adapter(update)  # no step loop yet to install it between two steps
    assert time.perf_counter() - t0 < 0.3  # was a 0.5 s wait for the loop
    assert isinstance(engine.model.get_submodule("blocks.0.attn.qkv"), MultiLoRALinear)
    engine.start()
    try:
        _assert_same(_answer(engine, PROMPTS[0], "early", "a1"), alone["a1"][0])
    finally:
        engine.shutdown()


def test_an_adapter_overflowing_float16_leaves_the_other_rows_exact():
    """In float16 one adapter's x A overflowing to inf must not reach the base's rows or
    another adapter's (a 0/1 mask product would make inf * 0 = NaN there)."""
    from lmforge.serve.multi_lora import attach_adapters

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4)).half()
    base = copy.deepcopy(model[0])
    small = (torch.randn(2, 8), torch.randn(4, 2))
    updates = {"huge": {"0": (torch.full((2, 8), 6e4), torch.ones(4, 2))}, "small": {"0": small}}
    slots = attach_adapters(model, updates)
    slots.select([None, "huge", "small"])
    x = torch.ones(3, 5, 8, dtype=torch.float16)
    with torch.inference_mode():
        y = model(x)
        assert torch.isinf(x[1] @ model[0].lora_a.T).any()  # the huge adapter does overflow
        assert torch.equal(y[0], base(x[0]))
        want = base(x[2]).float() + x[2].float() @ small[0].T @ small[1].T
        torch.testing.assert_close(y[2].float(), want, atol=2e-2, rtol=1e-2)


def test_an_adapter_whose_weights_overflow_the_model_dtype_is_refused():
    from lmforge.serve.multi_lora import attach_adapters

    model = nn.Sequential(nn.Linear(8, 4)).half()
    too_big = {"big": {"0": (torch.ones(2, 8), torch.full((4, 2), 1e6))}}  # past float16's max
    with pytest.raises(ConfigError, match=r"0: a LoRA adapter's A or B .* overflows .*float16"):
        attach_adapters(model, too_big)
