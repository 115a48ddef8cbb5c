"""CPU decode speed of compressed models, side by side in one process.

Greedy decoding (a prompt, then one cached token a step) of the same weights four ways,
round-robin so machine noise hits all alike, median of the rounds:

- **fp32 eager**: the Transformer through lmforge.model.generate (the baseline);
- **int8 weight-only**: the `compress quantize` checkpoint reloaded (kept int8: torch's int8
  matmul with bf16 activations; benchmarks/bench_quant_load.py measures its memory);
- **dynamic int8**: torch.ao dynamic quantization of every nn.Linear (int8 matmuls);
- **ONNX / onnxruntime**: the `compress export` graph with KV-cache inputs and outputs, decoded
  with the same greedy loop on numpy.

Also prints each variant's agreement with the fp32 tokens. Needs `pip install -e '.[onnx]'`.

Run: `OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_compress.py --preset tiny --new-tokens 64`
(or `--model DIR` for a trained model directory).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lmforge.compress.measure import prompt_ids
from lmforge.compress.onnx_export import empty_past, export_onnx, ort_session, run_step
from lmforge.compress.quantize import dynamic_int8, quantize_dir
from lmforge.model.config import preset_config
from lmforge.model.convert import load_pretrained, save_pretrained
from lmforge.model.generate import generate
from lmforge.model.transformer import Transformer


def torch_decoder(model: torch.nn.Module, idx: torch.Tensor, new: int) -> Callable[[], list[int]]:
    @torch.no_grad()
    def run() -> list[int]:
        return generate(model, idx, new, greedy=True)[0, idx.size(1) :].tolist()

    return run


def ort_decoder(session, model, idx: torch.Tensor, new: int) -> Callable[[], list[int]]:
    def run() -> list[int]:
        ids, mask, past, out = idx, torch.ones_like(idx), empty_past(model, 1), []
        for _ in range(new):
            logits, keys, values = run_step(session, ids, mask, past)
            ids = torch.from_numpy(logits[:, -1].argmax(-1, keepdims=True))
            out.append(int(ids))
            mask, past = torch.ones((1, mask.size(1) + 1), dtype=torch.long), (keys, values)
        return out

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="model directory (default: a random --preset)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-compress-"))
    src = args.model
    if src is None:
        torch.manual_seed(0)
        src = work / "model"
        save_pretrained(Transformer(preset_config(args.preset)), src)
    model = load_pretrained(src)
    quantize_dir(src, work / "int8", "int8", 32)
    export_onnx(model, work / "model.onnx")
    idx = prompt_ids(model.config.vocab_size, args.prompt_tokens)
    variants = {
        "fp32 eager": torch_decoder(model, idx, args.new_tokens),
        "int8 weight-only": torch_decoder(load_pretrained(work / "int8"), idx, args.new_tokens),
        "dynamic int8": torch_decoder(dynamic_int8(model), idx, args.new_tokens),
    }
    session = ort_session(work / "model.onnx")
    variants["ONNX onnxruntime"] = ort_decoder(session, model, idx, args.new_tokens)
    times: dict[str, list[float]] = {name: [] for name in variants}
    tokens = {name: run() for name, run in variants.items()}  # warm-up, and the outputs
    for _ in range(args.rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    size = {"fp32 eager": (src / "model.safetensors").stat().st_size,
            "int8 weight-only": (work / "int8" / "model.safetensors").stat().st_size,
            "ONNX onnxruntime": (work / "model.onnx").stat().st_size}  # fmt: skip
    print(f"{model.num_params() / 1e6:.2f}M params, {args.prompt_tokens}-token prompt, "
          f"{args.new_tokens} new tokens, {torch.get_num_threads()} threads, "
          f"median of {args.rounds}")  # fmt: skip
    base = statistics.median(times["fp32 eager"])
    print(f"{'variant':<18}{'tokens/s':>10}{'vs fp32':>9}{'MB':>8}{'same tokens':>13}")
    for name in variants:
        t = statistics.median(times[name])
        same = sum(a == b for a, b in zip(tokens[name], tokens["fp32 eager"], strict=True))
        mb = f"{size[name] / 1e6:.2f}" if name in size else "-"
        print(f"{name:<18}{args.new_tokens / t:>10.0f}{base / t:>8.2f}x{mb:>8}"
              f"{same:>9}/{args.new_tokens}")  # fmt: skip


if __name__ == "__main__":
    main()
