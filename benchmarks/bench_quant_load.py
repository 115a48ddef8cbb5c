"""Memory and CPU decode speed of a quantized checkpoint loaded quantized, against fp32.

One random model of a preset (default gpt2-124m's shape; nothing downloaded) is saved in fp32 and
quantized by `compress quantize`'s quantize_dir to int8 and int4. Then:

- **memory**: each directory is loaded by load_pretrained (quantized="keep", the serve/eval
  default) in a fresh child process, which reports what its resident set (VmRSS) grew by after
  the load and after decoding 2 tokens ("decoding": every weight read once, as when serving;
  fp32 weights are safetensors' file mapping, resident once touched), the peak (VmHWM: int4
  reads the file's mapping while repacking; in our own layout it dequantizes each matrix per
  forward) and the summed bytes of the parameters and buffers; "RSS vs fp32" compares the
  decoding column; "in kernel layout" counts the int4 matrices repacked for torch's CPU int4
  kernel (model.int4pack; the rest stay in ours: a table no matmul uses, such as GPT-2's
  positions, dequantizes the rows it looks up, a matrix in a group size the kernel lacks
  dequantizes per forward);
- **speed**: the three models decode greedily (lmforge.model.generate: prompt, then one cached
  token a step) in this process, round-robin so machine noise hits all alike, median of the
  rounds; also how many tokens agree with fp32's.

Run: `OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/bench_quant_load.py`
(`--preset micro --new-tokens 8 --rounds 1` for a quick check; `--vocab-size 50257` for GPT-2's
own vocabulary, whose rows the int4 kernel takes padded to a multiple of 16).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _rates import time_round_robin

from lmforge.compress.measure import prompt_ids
from lmforge.compress.quantize import quantize_dir
from lmforge.model.config import preset_config
from lmforge.model.convert import load_pretrained, save_pretrained
from lmforge.model.generate import generate
from lmforge.model.quant import QuantEmbedding, QuantLinear
from lmforge.model.transformer import Transformer

VARIANTS = ("fp32", "int8", "int4")


def proc_status_kb(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in kB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct parameter and buffer (a tied table counts once)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def measure_load(model_dir: Path, warmup_dir: Path) -> dict[str, float | str]:
    """(child process) What loading model_dir adds to this process's memory, measured after
    loading a micro int8 model once: torch's lazy imports on a first load (~75 MB) are not the
    model's."""
    load_pretrained(warmup_dir)
    gc.collect()
    before = proc_status_kb("VmRSS")
    start = time.perf_counter()
    model = load_pretrained(model_dir)
    load_s = time.perf_counter() - start
    gc.collect()
    loaded = proc_status_kb("VmRSS")
    with torch.no_grad():  # every weight is read once, as serving does
        generate(model, prompt_ids(model.config.vocab_size, 8), 2, greedy=True)
    return {
        "rss_mb": (loaded - before) / 1024,
        "decoding_rss_mb": (proc_status_kb("VmRSS") - before) / 1024,
        "peak_mb": (proc_status_kb("VmHWM") - before) / 1024,
        "tensor_mb": tensor_bytes(model) / 2**20,
        "load_s": load_s,
        "kernel_layout": kernel_layout(model),
    }


def kernel_layout(model: torch.nn.Module) -> str:
    """How many of the model's quantized matrices are held in torch's int4 kernel layout."""
    kept = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
    return f"{sum(m.kernel_packed for m in kept)}/{len(kept)}" if kept else "-"


def load_in_child(model_dir: Path, warmup_dir: Path) -> dict[str, float | str]:
    out = subprocess.run(
        [sys.executable, __file__, "--measure-load", str(model_dir), str(warmup_dir)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def decode_times(
    dirs: dict[str, Path], prompt_tokens: int, new_tokens: int, rounds: int
) -> tuple[dict[str, float], dict[str, int]]:
    """Median decode seconds of each variant (round-robin) and its tokens equal to fp32's."""
    models = {name: load_pretrained(d) for name, d in dirs.items()}
    idx = prompt_ids(models["fp32"].config.vocab_size, prompt_tokens)

    def decoder(name: str) -> Callable[[], list[list[int]]]:
        @torch.no_grad()
        def run() -> list[list[int]]:
            return generate(models[name], idx, new_tokens, greedy=True)[:, prompt_tokens:].tolist()

        return run

    times, outputs = time_round_robin({name: decoder(name) for name in models}, rounds)
    tokens = {name: out[0] for name, out in outputs.items()}  # greedy: every round's the same
    same = {
        n: sum(a == b for a, b in zip(t, tokens["fp32"], strict=True)) for n, t in tokens.items()
    }
    return {name: statistics.median(t) for name, t in times.items()}, same


def make_dirs(
    work: Path, preset: str, group_size: int, vocab_size: int | None = None
) -> tuple[dict[str, Path], int]:
    """fp32, int8 and int4 directories of one random `preset` model (`vocab_size` rows, if
    given; and its parameter count), plus the micro int8 warm-up directory measure_load loads
    first."""
    torch.manual_seed(0)
    config = preset_config(preset)
    model = Transformer(dataclasses.replace(config, vocab_size=vocab_size or config.vocab_size))
    n_params = model.num_params()
    save_pretrained(model, work / "fp32")
    del model
    dirs = {"fp32": work / "fp32"}
    for kind in VARIANTS[1:]:
        quantize_dir(dirs["fp32"], work / kind, kind, group_size)
        dirs[kind] = work / kind
    save_pretrained(Transformer(preset_config("micro")), work / "micro")
    quantize_dir(work / "micro", work / "warmup", "int8", 32)
    return dirs, n_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2-124m", help="model shape (random weights)")
    ap.add_argument("--group-size", type=int, default=32, help="int4 group size")
    ap.add_argument("--vocab-size", type=int, help="the preset's with another vocabulary")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--measure-load", type=Path, nargs=2, help=argparse.SUPPRESS)  # child's job
    args = ap.parse_args()
    if args.measure_load:
        print(json.dumps(measure_load(*args.measure_load)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-quant-load-") as tmp:  # ~1 GB for gpt2-124m
        work = Path(tmp)
        dirs, n_params = make_dirs(work, args.preset, args.group_size, args.vocab_size)
        memory = {name: load_in_child(d, work / "warmup") for name, d in dirs.items()}
        seconds, same = decode_times(dirs, args.prompt_tokens, args.new_tokens, args.rounds)
        file_mb = {n: (d / "model.safetensors").stat().st_size / 2**20 for n, d in dirs.items()}
    print(
        f"{args.preset}: {n_params / 1e6:.1f}M params, {torch.get_num_threads()} torch threads; "
        f"decode: {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, batch 1, "
        f"median of {args.rounds} round-robin rounds"
    )
    print(
        f"{'variant':<8}{'file MB':>8}{'tensor MB':>10}{'RSS +MB':>8}{'decoding':>9}{'peak':>7}"
        f"{'load s':>7}{'tokens/s':>9}{'RSS vs fp32':>12}{'speed vs fp32':>14}{'same':>7}"
        f"{'in kernel layout':>17}"
    )
    base = memory["fp32"]
    for name in dirs:
        m, t = memory[name], seconds[name]
        print(
            f"{name:<8}{file_mb[name]:>8.1f}{m['tensor_mb']:>10.1f}{m['rss_mb']:>8.1f}"
            f"{m['decoding_rss_mb']:>9.1f}{m['peak_mb']:>7.1f}{m['load_s']:>7.2f}"
            f"{args.new_tokens / t:>9.1f}{m['decoding_rss_mb'] / base['decoding_rss_mb']:>11.2f}x"
            f"{seconds['fp32'] / t:>13.2f}x{same[name]:>4}/{args.new_tokens}"
            f"{m['kernel_layout']:>17}"
        )


if __name__ == "__main__":
    main()
