"""Multi-LoRA serving: the cost of adapter rows in the engine's batch, and the memory it saves.

One base model (the `small` preset's body, random weights, a 4k vocabulary from
bench_serve_engine.make_tokenizer) and two LoRA adapters on its default targets (rank --rank, B
drawn non-zero, saved in PEFT's format and read back as `lmforge serve --lora` reads them).
The same burst of --requests prompts (32-64 tokens, --new-tokens greedy tokens each, ignore_eos
so the work is fixed), all submitted at once, runs through the engine:

- **base alone**: an engine with no adapters, every request on the base;
- **mixed**: an engine with both adapters attached, a third of the requests on each adapter
  and a third on the base (one running batch: the LoRA path of serve/multi_lora.py);
- **base, adapters attached**: the mixed engine, every request on the base (the path's floor).

Rounds alternate the settings; the medians of output tokens/s are printed with their ratio. The
mixed burst's adapter answers are checked token for token against engines of the merged models.
Then one decoding step of the same rows, timed with every row on the base and with the mixed
rows' adapters, interleaved (the path's cost without a burst's admission and sampling).
Memory: every distinct storage the engine holds for weights (the base's, the adapters' stacked
A/B, its record of the adapters: views into the stacks), against the weights of the base and
two merged copies (what serving three model directories holds); --memory-only prints only this.
--layer-only times one linear alone instead (the small preset's qkv, 384 -> 1152, --requests
decoding rows, two adapters of --rank): the base, the masked form the engine uses, and the
gathered form (each row's A and B gathered, two batched matmuls), interleaved.

Run: `cd benchmarks && PYTHONPATH=../src:. OMP_NUM_THREADS=1 ../.venv/bin/python
bench_serve_lora.py [--layer-only | --memory-only]`
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_serve_engine import make_tokenizer
from torch import nn


def build(out: Path, rank: int) -> tuple[Path, dict[str, tuple[Path, Path]]]:
    """(base dir, name -> (adapter dir, merged dir))."""
    from lmforge.finetune.lora import LoraConfig, inject, lora_modules, merge, save_peft_adapter
    from lmforge.model.config import preset_config
    from lmforge.model.convert import load_pretrained, save_pretrained
    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer.files import copy_tokenizer_files

    base = out / "base"
    base.mkdir()
    files = make_tokenizer(4096, base)
    torch.manual_seed(0)
    save_pretrained(Transformer(preset_config("small", vocab_size=files.vocab_size)), base)
    adapters = {}
    for seed, name in enumerate(("a1", "a2"), start=1):
        model = inject(load_pretrained(base, device="cpu"), LoraConfig(r=rank, alpha=2.0 * rank))
        torch.manual_seed(seed)
        for module in lora_modules(model).values():
            nn.init.normal_(module.lora_B.weight, std=0.05)
        adapter = save_peft_adapter(model, out / name / "adapter", base_model=str(base))
        save_pretrained(merge(model), out / name / "merged")
        copy_tokenizer_files(base, out / name / "merged")
        adapters[name] = (adapter, out / name / "merged")
    return base, adapters


def engine_for(model_dir: Path, adapters: dict[str, Path], batch: int):
    from lmforge.serve.engine import Engine
    from lmforge.serve.lora_adapters import read_adapter

    engine = Engine.from_dir(model_dir, device="cpu", max_batch_size=batch, threads=1)
    engine.attach_adapters([read_adapter(engine.model, n, p) for n, p in adapters.items()])
    engine.start()
    return engine


def burst(engine, prompts, names, n_new: int) -> tuple[list[list[int]], float]:
    """(answers, output tokens/s) of all prompts submitted at once, prompt i on names[i]."""
    from lmforge.serve.engine import SamplingParams, collect

    params = SamplingParams(max_tokens=n_new, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    handles = [
        engine.submit(p, params, f"r{time.monotonic_ns()}-{i}", adapter=name)
        for i, (p, name) in enumerate(zip(prompts, names, strict=True))
    ]
    answers = [collect(h).token_ids for h in handles]
    return answers, len(prompts) * n_new / (time.perf_counter() - t0)


def step_times(engine, prompts, names_by_label: dict, steps: int) -> dict[str, float]:
    """Median ms of one decoding step of all prompts' rows (their first 48 tokens prefilled, the
    cache growing a column a step), the rows' adapters set per label, the labels interleaved step
    by step so the machine's load drifts hit them alike."""
    from lmforge.serve.causal_step import decode_pass, prefill_pass

    device = engine.device
    with torch.inference_mode():
        engine._adapters.select([None] * len(prompts))
        cache, _ = prefill_pass(engine.model, [p[:48] for p in prompts], device)
        times: dict[str, list[float]] = {label: [] for label in names_by_label}
        for _ in range(steps):
            for label, names in names_by_label.items():
                engine._adapters.select(names)
                t0 = time.perf_counter()
                decode_pass(engine.model, cache, [1] * len(prompts), device)
                times[label].append(1e3 * (time.perf_counter() - t0))
    return {label: statistics.median(t) for label, t in times.items()}


def held_bytes(engine) -> int:
    """Bytes of every distinct storage the engine holds for weights: the model's parameters and
    buffers (the adapters' stacks among them) and its record of the adapters (views into the
    stacks since each adapter is held once: counted once)."""
    tensors = [*engine.model.parameters(), *engine.model.buffers()]
    tensors += [t for updates in engine._lora.values() for pair in updates.values() for t in pair]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def memory(base: Path, adapters: dict[str, tuple[Path, Path]]) -> None:
    """Prints what an engine with both adapters holds against the base's and merged copies'."""
    plain = engine_for(base, {}, 1)
    lora = engine_for(base, {n: a for n, (a, _) in adapters.items()}, 1)
    base_bytes, lora_bytes = held_bytes(plain), held_bytes(lora)
    plain.shutdown()
    lora.shutdown()
    mib = 2**20
    print(f"weights: base + 2 adapters {lora_bytes / mib:.1f} MiB (adapters "
          f"{(lora_bytes - base_bytes) / mib:.2f}) vs base + 2 merged copies "
          f"{3 * base_bytes / mib:.1f} MiB")  # fmt: skip


def layer_times(rows: int, n_in: int, n_out: int, rank: int, reps: int) -> dict[str, float]:
    """Median us of one linear's forward on a decoding step's rows (rows, 1, n_in), two adapters
    of `rank` and the base in turn over the rows: the base alone, the masked form
    (serve/multi_lora.py: every adapter's A in one matmul, the rows' columns kept, one matmul
    through the stacked B) and the gathered form (each row's A and B gathered, two batched
    matmuls), interleaved rep by rep."""
    from lmforge.serve.multi_lora import attach_adapters

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(n_in, n_out))
    base = model[0]
    updates = {name: {"0": (0.05 * torch.randn(rank, n_in), 0.05 * torch.randn(n_out, rank))}
               for name in ("a1", "a2")}  # fmt: skip
    slots = attach_adapters(model, updates)
    names = [(None, "a1", "a2")[i % 3] for i in range(rows)]
    slots.select(names)
    index = slots.current()
    zero = (torch.zeros(rank, n_in), torch.zeros(n_out, rank))
    a_all = torch.stack([zero[0]] + [u["0"][0] for u in updates.values()])  # (3, r, in)
    b_all = torch.stack([zero[1]] + [u["0"][1] for u in updates.values()])  # (3, out, r)

    def gathered(x):
        h = torch.bmm(x, a_all[index].transpose(1, 2))  # (rows, 1, r)
        return base(x) + torch.bmm(h, b_all[index].transpose(1, 2))

    forms = {"base": base, "masked": model, "gathered": gathered}
    x = torch.randn(rows, 1, n_in)
    torch.testing.assert_close(model(x), gathered(x), rtol=1e-4, atol=1e-5)  # the same sums
    times: dict[str, list[float]] = {label: [] for label in forms}
    with torch.inference_mode():
        for _ in range(reps):
            for label, form in forms.items():
                t0 = time.perf_counter()
                form(x)
                times[label].append(1e6 * (time.perf_counter() - t0))
    return {label: statistics.median(t) for label, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layer-only", action="store_true",
                    help="time one linear alone: base, masked and gathered forms")  # fmt: skip
    ap.add_argument("--memory-only", action="store_true", help="only the weights' bytes")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.layer_only:  # the small preset's qkv: 384 -> 1152
        us = layer_times(args.requests, 384, 1152, args.rank, 2000)
        print(f"one linear 384 -> 1152, {args.requests} rows, 2 adapters r={args.rank}: base "
              f"{us['base']:.0f} us, masked +{us['masked'] - us['base']:.0f} us, gathered "
              f"+{us['gathered'] - us['base']:.0f} us (medians of 2000)")  # fmt: skip
        return
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        base, adapters = build(Path(tmp), args.rank)
        if args.memory_only:
            memory(base, adapters)
            return
        prompts = [rng.integers(1, 4000, int(rng.integers(32, 65))).tolist()
                   for _ in range(args.requests)]  # fmt: skip
        mixed_names = [(None, "a1", "a2")[i % 3] for i in range(args.requests)]
        plain = engine_for(base, {}, args.requests)
        lora = engine_for(base, {n: a for n, (a, _) in adapters.items()}, args.requests)
        rates: dict[str, list[float]] = {"base alone": [], "mixed": [], "base, attached": []}
        runs = [
            ("base alone", plain, [None] * args.requests),
            ("mixed", lora, mixed_names),
            ("base, attached", lora, [None] * args.requests),
        ]
        burst(plain, prompts[:3], [None] * 3, 4)  # warm-up
        burst(lora, prompts[:3], ["a1", "a2", None], 4)
        for _ in range(args.rounds):
            for label, engine, names in runs:
                answers, rate = burst(engine, prompts, names, args.new_tokens)
                rates[label].append(rate)
                if label == "mixed":
                    mixed_answers = answers
        for name, (_, merged_dir) in adapters.items():
            merged = engine_for(merged_dir, {}, args.requests)
            idx = [i for i, n in enumerate(mixed_names) if n == name]
            want, _ = burst(merged, [prompts[i] for i in idx], [None] * len(idx), args.new_tokens)
            same = sum(w == mixed_answers[i] for w, i in zip(want, idx, strict=True))
            print(f"{name}: {same}/{len(idx)} mixed-burst answers equal its merged model's")
            merged.shutdown()
        steps = step_times(
            lora, prompts, {"base rows": [None] * args.requests, "mixed rows": mixed_names}, 40
        )
        plain.shutdown()
        lora.shutdown()
        memory(base, adapters)
    medians = {label: statistics.median(r) for label, r in rates.items()}
    for label, r in rates.items():
        print(
            f"{label:>16}: {medians[label]:7.1f} tok/s  (rounds: {', '.join(f'{x:.1f}' for x in r)})"
        )
    print(f"mixed / base alone: {medians['mixed'] / medians['base alone']:.3f}")
    print(f"base attached / base alone: {medians['base, attached'] / medians['base alone']:.3f}")
    print(f"one decoding step, {args.requests} rows: base {steps['base rows']:.2f} ms, mixed "
          f"{steps['mixed rows']:.2f} ms ({steps['mixed rows'] / steps['base rows']:.3f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
