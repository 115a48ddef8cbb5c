"""The quickstart's pretraining throughput by torch thread count, and under a CPU quota.

Each row runs in its own process (torch's thread pool is sized once per process): the
quickstart's pretraining step (the `tiny` preset with a 4096-token vocabulary and the `train:`
section of the built-in quickstart recipe: 32 x 128 tokens a step, its optimizer) through the
real training loop, `warmup` steps then `steps` timed ones.

Rows: 1 and 2 threads set explicitly, 8 threads (what torch's default picks on an 8-core host
when only 2 cores are usable), torch's own default, and lmforge's default
(`configure_torch_threads`, which every stage applies: the CPUs this process may use). As root
on a machine with a writable cgroup v1 cpu controller it adds the case that hurt a newcomer: a
CPU quota smaller than the cores the kernel shows (here a 1-CPU quota on this 2-core machine),
where torch's default keeps one thread per core and lmforge's uses the quota.

    python benchmarks/bench_quickstart_threads.py [--steps 40] [--quota 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

V1_CPU = Path("/sys/fs/cgroup/cpu")
ROWS = {
    "1 thread": "1",
    "2 threads": "2",
    "8 threads": "8",
    "torch default": "torch",
    "lmforge default": "lmforge",
}


def measure(threads: str, steps: int, warmup: int) -> dict[str, float]:
    """One row, in this process: tokens/s of the quickstart's pretraining step."""
    import logging

    import torch
    from _common import time_lmforge, write_tokens

    from lmforge.common.threads import configure_torch_threads
    from lmforge.config import load_yaml
    from lmforge.model.config import preset_config
    from lmforge.model.transformer import Transformer
    from lmforge.runner import builtin_recipe
    from lmforge.train.config import TrainConfig
    from lmforge.train.pretrain import lm_loss

    if threads == "lmforge":
        configure_torch_threads()
    elif threads != "torch":
        torch.set_num_threads(int(threads))
    n_threads = torch.get_num_threads()  # the loop does not change it: it runs outside a stage
    logging.getLogger("lmforge").setLevel(logging.WARNING)
    quickstart = load_yaml(builtin_recipe("quickstart"))["stages"]["pretrain"]["train"]
    timing = dict(max_steps=warmup + steps, warmup_steps=0, eval_every=0, ckpt_every=0)
    tc = TrainConfig(**{**quickstart, **timing, "device": "cpu"})
    torch.manual_seed(0)
    model = Transformer(preset_config("tiny", vocab_size=4096))
    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "train.bin"
        write_tokens(tokens, 4096, n=300_000)
        wall, cpu = time_lmforge(model, lm_loss, tokens, tc, warmup)
    return {
        "threads": n_threads,
        "optimizer": tc.optimizer,
        "tokens_per_s": round(wall),
        "tokens_per_cpu_s": round(cpu),
    }


def run_row(threads: str, args: argparse.Namespace, cgroup: Path | None = None) -> dict:
    """Runs one row in a fresh process, inside `cgroup` when given."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    cmd = [sys.executable, __file__, "--row", threads, "--steps", str(args.steps)]
    cmd += ["--warmup", str(args.warmup)]
    enter = None
    if cgroup is not None:

        def enter() -> None:  # runs in the child before exec: join the group
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    out = subprocess.run(cmd, env=env, capture_output=True, text=True, preexec_fn=enter)
    if out.returncode != 0:
        sys.exit(f"row {threads} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def quota_group(quota: float) -> Path | None:
    """A fresh cgroup v1 cpu group with the given quota, or None where this is not possible."""
    if not (V1_CPU / "cpu.cfs_quota_us").exists() or not os.access(V1_CPU, os.W_OK):
        return None
    group = V1_CPU / f"lmforge-bench-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    (group / "cpu.cfs_quota_us").write_text(str(int(quota * 100_000)))
    return group


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--quota", type=float, default=1.0, help="CPUs of the quota rows")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        print(json.dumps(measure(args.row, args.steps, args.warmup)))
        return
    from lmforge.artifacts import cpu_model
    from lmforge.common.threads import usable_cpus

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {usable_cpus()} usable")
    results: dict[str, dict] = {}
    for name, threads in ROWS.items():
        results[name] = run_row(threads, args)
        print(f"{name:>28}: {results[name]}", flush=True)
    group = quota_group(args.quota)
    if group is None:
        print("quota rows skipped: needs root and a writable cgroup v1 cpu controller")
    else:
        try:
            for name in ("torch default", "lmforge default"):
                key = f"{name}, {args.quota:g}-CPU quota"
                results[key] = run_row(ROWS[name], args, cgroup=group)
                print(f"{key:>28}: {results[key]}", flush=True)
        finally:
            group.rmdir()
    summary = {
        "two_vs_one_thread": round(
            results["2 threads"]["tokens_per_s"] / results["1 thread"]["tokens_per_s"], 2
        ),
        "lmforge_vs_torch_default": round(
            results["lmforge default"]["tokens_per_s"] / results["torch default"]["tokens_per_s"],
            2,
        ),
    }
    quota_key = f"{args.quota:g}-CPU quota"
    if f"torch default, {quota_key}" in results:
        summary["lmforge_vs_torch_default_under_quota"] = round(
            results[f"lmforge default, {quota_key}"]["tokens_per_s"]
            / results[f"torch default, {quota_key}"]["tokens_per_s"],
            2,
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
