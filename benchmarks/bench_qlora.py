"""Step time and peak memory of a QLoRA fine-tune on CPU, one lmforge source tree against another.

A random model of a preset gets LoRA adapters over a quantized frozen base (finetune.lora.inject,
`lora.quantize`), then trains with AdamW on random token windows (next-token loss). Each source
tree (`--src NAME=PATH`, the `src` directory of an lmforge checkout: e.g. a worktree of an older
commit against this one) runs in a child process of its own, round-robin for `--rounds`, so
machine noise hits all alike. A child reports:

- **step s**: median and fastest wall time of `--steps` optimizer steps after one warm-up step
  (on a loaded machine the fastest is the steadier estimate of what a step costs);
- **RSS MB**: resident set before the first step (model, codes, adapters);
- **peak +MB**: how far the resident set rose above that during all the steps (VmHWM, reset
  through /proc/self/clear_refs before the first: AdamW's state, activations, and whatever the
  frozen base materializes in floats, e.g. dequantized weights kept for the backward);
- **kernel bases**: how many quantized bases are packed for torch's CPU int4 kernel.

Run: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_qlora.py --src before=/tmp/old/src
--src after=src` (`--preset micro --steps 2 --rounds 1` for a quick check).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def proc_status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(args: argparse.Namespace) -> dict[str, float]:
    """One QLoRA run in this process (the lmforge found on PYTHONPATH)."""
    import torch
    import torch.nn.functional as F

    from lmforge.finetune.lora import LoraConfig, inject, lora_modules
    from lmforge.model.config import preset_config
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    config = preset_config(args.preset)
    model = inject(Transformer(config), LoraConfig(quantize=args.quantize, group_size=32))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(1)

    def step() -> float:
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), generator=gen)
        start = time.perf_counter()
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    gc.collect()
    rss = proc_status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    step()  # warm-up: AdamW's state exists from here on
    times = [step() for _ in range(args.steps)]
    bases = [m.base for m in lora_modules(model).values()]
    return {
        "step_s": statistics.median(times),
        "step_min_s": min(times),
        "rss_mb": rss,
        "peak_plus_mb": proc_status_mb("VmHWM") - rss,
        "kernel_bases": sum(bool(getattr(b, "kernel_packed", False)) for b in bases),
        "bases": len(bases),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", action="append", default=[], help="NAME=PATH of an lmforge src dir")
    ap.add_argument("--preset", default="small", help="model preset (random weights)")
    ap.add_argument("--quantize", default="int4", choices=["none", "int8", "int4"])
    ap.add_argument("--batch", type=int, default=8, help="sequences a step")
    ap.add_argument("--seq", type=int, default=128, help="tokens a sequence")
    ap.add_argument("--steps", type=int, default=5, help="timed steps after the warm-up step")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each source tree, round-robin")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    trees = dict(s.split("=", 1) for s in args.src) or {"this": str(Path("src").resolve())}
    flags = [f"--{k}={getattr(args, k)}" for k in ("preset", "quantize", "batch", "seq", "steps")]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, src in trees.items():
            env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
            cmd = [sys.executable, __file__, "--child", *flags]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(name, runs[name][-1], flush=True)
    print(f"load average {os.getloadavg()[0]:.1f}; {' '.join(flags)}; medians of the rounds")
    print("| tree | step s | fastest step s | RSS MB | peak +MB | kernel bases |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rows in runs.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        print(
            f"| {name} | {med['step_s']:.3f} | {min(r['step_min_s'] for r in rows):.3f} "
            f"| {med['rss_mb']:.1f} | {med['peak_plus_mb']:.1f} "
            f"| {int(med['kernel_bases'])}/{int(med['bases'])} |"
        )


if __name__ == "__main__":
    main()
