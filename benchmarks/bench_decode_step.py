"""One decoding step of our Transformer against transformers' LlamaForCausalLM, same weights.

`lmforge serve` trailed transformers' batched generate on the same requests, and the engine is
forward-bound on `small`; this isolates the model's decode step from everything around it. Our
model (the `--preset` body, `small` by default, `--vocab` tokens, random weights) is exported
with lmforge's own exporter and loaded back by transformers, so both sides hold the same
weights. Per batch size:

- both prefill the same prompts (`--prompt` tokens each; with `--padded`, rows of different
  lengths, left-padded, as a serving batch has), then decode `--steps` steps feeding each row's
  greedy token; the time of the decode steps only is reported, as ms per step;
- ours runs the serving engine's path (BatchCache, hidden_states, lm_head on the last position)
  and generate()'s (KVCache); HF runs its forward with a DynamicCache and `logits_to_keep=1`,
  the way its generate() calls it (attention_mask and position_ids only when padded);
- contenders are interleaved round by round, so load on a shared machine falls on each alike;
  the ratio is ours / HF at each one's median (> 1: ours is slower);
- every contender's greedy tokens are checked against HF's (the comparison is void otherwise).

`--compile` adds our two paths with decoding compiled (model/compiled_decode.py: the serving
engine's decode_pass(compiled=True) and generate()'s FixedShapeSteps) and their compiled / eager
ratios (< 1: compiling pays); the compile itself happens in the untimed warm-up round and is
printed per batch.

Run: `OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/bench_decode_step.py`
(`--padded` for left-padded rows, `--profile` for torch.profiler's op table of each side,
`--compile` for the compiled arm, `--preset tiny --batches 1,16` for the smaller body).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

Step = Callable[[], list[list[int]]]  # runs prefill + decode, returns tokens; times itself
COMPILE_COLUMNS = (
    " BatchCache compiled ms/step | KVCache compiled ms/step | BatchCache compiled / eager "
    "| KVCache compiled / eager | warm-up s (compiles included) |"
)


def build(preset: str, vocab: int, block_size: int, out: Path):
    """Our `preset` body with random weights, and transformers' load of its export."""
    from transformers import AutoModelForCausalLM

    from lmforge.model.config import preset_config
    from lmforge.model.convert import save_pretrained
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    ours = Transformer(preset_config(preset, vocab_size=vocab, block_size=block_size)).eval()
    save_pretrained(ours, out)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="sdpa")
    return ours, hf.eval()


def prompts(batch: int, length: int, padded: bool, vocab: int) -> tuple[Tensor, Tensor | None]:
    """(ids, pad_mask or None) of `batch` rows; padded rows are 1/2 to all of `length` long."""
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    if not padded or batch == 1:
        return ids, None
    lengths = torch.linspace(length // 2, length, batch).long()
    mask = (torch.arange(length)[None, :] >= (length - lengths)[:, None]).long()
    return ids * mask, mask


class Timed:
    """Seconds spent in decode steps, summed over the rounds a contender ran."""

    def __init__(self) -> None:
        self.rounds: list[float] = []


def ours_step(
    model, ids: Tensor, mask: Tensor | None, steps: int, cache_kind: str, clock: Timed,
    compiled: bool = False,
):  # fmt: skip
    from lmforge.model.compiled_decode import FixedShapeSteps, decode_capacity
    from lmforge.model.generate import KVCache
    from lmforge.serve.batch_cache import BatchCache
    from lmforge.serve.causal_step import decode_pass

    def run() -> list[list[int]]:
        B, T = ids.shape
        if cache_kind == "batch":
            cache = BatchCache.empty(model, B, T)
        else:
            size = decode_capacity(T + steps, model.config.block_size) if compiled else T + steps
            cache = KVCache.for_model(model, B, size)
        h = model.hidden_states(ids, kv_cache=cache, pad_mask=mask)
        if cache_kind == "batch":
            cache.pad_mask = mask if mask is not None else torch.ones_like(ids)
        nxt = model.lm_head(h[:, -1]).argmax(-1)
        out = [nxt]
        step_mask = mask
        fixed = FixedShapeSteps(model, cache, mask, T) if compiled and cache_kind == "kv" else None
        t0 = time.perf_counter()
        for i in range(steps - 1):
            pos = T + i
            if compiled:  # the engine's decode_pass (its ids from a list, as the engine has them)
                logits = (
                    fixed(nxt[:, None])
                    if fixed is not None
                    else decode_pass(model, cache, nxt.tolist(), ids.device, compiled=True)
                )
                nxt = logits.argmax(-1)
                out.append(nxt)
                continue
            if cache_kind == "batch":
                cache.reserve(1)
                padded = cache.padded()
                step_mask = cache.extend_mask(1)
                step_mask = step_mask if padded else None
            elif step_mask is not None:
                step_mask = torch.cat([step_mask, torch.ones_like(step_mask[:, :1])], dim=1)
            h = model.hidden_states(nxt[:, None], kv_cache=cache, start_pos=pos, pad_mask=step_mask)
            nxt = model.lm_head(h[:, -1]).argmax(-1)
            out.append(nxt)
        clock.rounds.append(time.perf_counter() - t0)
        return torch.stack(out, 1).tolist()

    return run


def hf_step(model, ids: Tensor, mask: Tensor | None, steps: int, clock: Timed):
    from transformers import DynamicCache

    def run() -> list[list[int]]:
        cache = DynamicCache(config=model.config)
        kw = {}
        if mask is not None:
            kw = dict(attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
        logits = model(ids, cache=cache, use_cache=True, logits_to_keep=1, **kw).logits
        nxt = logits[:, -1].argmax(-1)
        out = [nxt]
        step_mask = mask
        t0 = time.perf_counter()
        for _ in range(steps - 1):
            kw = {}  # unpadded: positions follow from the cache's length
            if step_mask is not None:
                step_mask = torch.cat([step_mask, torch.ones_like(step_mask[:, :1])], dim=1)
                kw = dict(attention_mask=step_mask, position_ids=step_mask.sum(1, keepdim=True) - 1)
            logits = model(nxt[:, None], cache=cache, use_cache=True, logits_to_keep=1, **kw).logits
            nxt = logits[:, -1].argmax(-1)
            out.append(nxt)
        clock.rounds.append(time.perf_counter() - t0)
        return torch.stack(out, 1).tolist()

    return run


def profile(name: str, fn: Step) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(f"\n== {name}: torch.profiler, one prefill + decode ==")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batches", default="1,4,16", help="batch sizes")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per row (the longest)")
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--padded", action="store_true", help="rows of different prompt lengths")
    ap.add_argument("--preset", default="small", help="model shape: small (11M) or tiny (1.3M)")
    ap.add_argument("--vocab", type=int, default=4096, help="vocabulary (bench_serve's: ~300)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="print op tables (largest batch)")
    ap.add_argument("--compile", action="store_true", help="add our paths, decoding compiled")
    args = ap.parse_args()
    if args.steps < 2:
        ap.error(f"--steps {args.steps}: at least 2 (the first token comes from the prefill)")
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        ours, hf = build(args.preset, args.vocab, 256, Path(tmp))
    print(f"`{args.preset}` body {ours.num_params() / 1e6:.1f}M params, vocab {args.vocab}, prompt "
          f"{args.prompt} tokens{' (left-padded, 1/2 to full length)' if args.padded else ''}, {args.steps} decode "
          f"steps, {args.rounds} rounds, {torch.get_num_threads()} thread(s), "
          f"torch {torch.__version__}")  # fmt: skip
    print("\n| batch | ours BatchCache ms/step | ours KVCache ms/step | HF ms/step "
          "| BatchCache / HF | KVCache / HF |" + COMPILE_COLUMNS * args.compile
          + "\n|---:|---:|---:|---:|---:|---:|" + "---:|" * 5 * args.compile)  # fmt: skip
    batches = [int(b) for b in args.batches.split(",")]
    with torch.inference_mode():
        for batch in batches:
            ids, mask = prompts(batch, args.prompt, args.padded, args.vocab)
            clocks = {name: Timed() for name in ("batch", "kv", "hf")}
            runs = {
                "batch": ours_step(ours, ids, mask, args.steps, "batch", clocks["batch"]),
                "kv": ours_step(ours, ids, mask, args.steps, "kv", clocks["kv"]),
                "hf": hf_step(hf, ids, mask, args.steps, clocks["hf"]),
            }
            if args.compile:
                for kind in ("batch", "kv"):
                    clocks[f"{kind}+c"] = Timed()
                    runs[f"{kind}+c"] = ours_step(
                        ours, ids, mask, args.steps, kind, clocks[f"{kind}+c"], compiled=True
                    )
            t0 = time.perf_counter()
            tokens = {name: run() for name, run in runs.items()}  # warm-up, and the check
            warm_s = time.perf_counter() - t0  # the compiles, when --compile
            for name in [n for n in runs if n != "hf"]:
                if tokens[name] != tokens["hf"]:
                    raise SystemExit(f"batch {batch}: {name}'s greedy tokens differ from HF's")
            for clock in clocks.values():
                clock.rounds.clear()
            for _ in range(args.rounds):
                for run in runs.values():
                    run()
            ms = {
                n: statistics.median(c.rounds) * 1e3 / (args.steps - 1) for n, c in clocks.items()
            }
            row = (f"| {batch} | {ms['batch']:.2f} | {ms['kv']:.2f} | {ms['hf']:.2f} "
                   f"| {ms['batch'] / ms['hf']:.2f}x | {ms['kv'] / ms['hf']:.2f}x |")  # fmt: skip
            if args.compile:
                row += (f" {ms['batch+c']:.2f} | {ms['kv+c']:.2f} | {ms['batch+c'] / ms['batch']:.2f}x "
                        f"| {ms['kv+c'] / ms['kv']:.2f}x | {warm_s:.0f} |")  # fmt: skip
            print(row)
            if args.profile and batch == max(batches):
                profile("ours (BatchCache)", runs["batch"])
                profile("HF", runs["hf"])


if __name__ == "__main__":
    main()
