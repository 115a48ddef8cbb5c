"""CPU training throughput: lmforge's pretraining step vs nanoGPT's training loop, same shape.

The shape is nanoGPT's documented CPU configuration (README, "I only have a macbook"):
4 layers, 4 heads, 128 wide, block 64, batch 12, vocab 65 (shakespeare_char), dropout 0, no
bias, GELU MLP, learned positions, tied embeddings, AdamW lr 1e-3 betas (0.9, 0.99), grad clip 1.

lmforge runs the real `lmforge.train.loop.train()` (TokenWindows loader, fused AdamW, metrics and
progress bookkeeping included) on `Transformer` configured to the same architecture. nanoGPT runs
its own `model.py` (imported from --nanogpt-dir, never vendored here) in a transcription of its
train.py iteration: get_batch from a memmap, forward, backward, clip, step, zero_grad, loss.item().
Both use the same uint16 token file. Rounds alternate A/B to spread out noise from a shared
machine; the ratios reported are of the medians, by wall time and by process CPU time (the\nlatter barely moves when other jobs share the cores; use --threads 1 for the steadiest number).

    python benchmarks/bench_train_cpu.py --nanogpt-dir /tmp/nanogpt

(get model.py with: git --git-dir <nanoGPT mirror> show HEAD:model.py > /tmp/nanogpt/model.py)
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path

import torch
from _common import (
    import_nanogpt,
    nanogpt_get_batch,
    nanogpt_loss,
    time_lmforge,
    time_nanogpt_loop,
    write_tokens,
)

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.train.config import TrainConfig
from lmforge.train.pretrain import lm_loss

SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65)
BATCH, LR, BETAS = 12, 1e-3, (0.9, 0.99)
CPU = torch.device("cpu")


def our_model() -> torch.nn.Module:
    """lmforge's Transformer in GPT-2 style at nanoGPT's shape, with nanoGPT's exact (erf) GELU."""
    cfg = ModelConfig(
        vocab_size=SHAPE["vocab_size"], n_layer=SHAPE["n_layer"], n_head=SHAPE["n_head"],
        n_kv_head=SHAPE["n_head"], n_embd=SHAPE["n_embd"], intermediate_size=4 * SHAPE["n_embd"],
        block_size=SHAPE["block_size"], norm="layernorm", pos="learned", mlp="gelu_exact", bias=False,
        tie_embeddings=True,
    )  # fmt: skip
    return Transformer(cfg)


def nanogpt_model(nanogpt_dir: Path) -> torch.nn.Module:
    ng = import_nanogpt(nanogpt_dir)
    return ng.GPT(ng.GPTConfig(**SHAPE, dropout=0.0, bias=False))


def run_lmforge(
    model: torch.nn.Module, loss_fn, tokens_path: Path, warmup: int, steps: int
) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second) of lmforge's loop after `warmup` steps."""
    tc = TrainConfig(
        max_steps=warmup + steps, lr=LR, betas=BETAS, micro_batch_size=BATCH,
        seq_len=SHAPE["block_size"], warmup_steps=0, schedule="constant", eval_every=0,
        ckpt_every=0, grad_clip=1.0, weight_decay=0.1, device="cpu",
    )  # fmt: skip
    return time_lmforge(model, loss_fn, tokens_path, tc, warmup)


def run_nanogpt(
    nanogpt_dir: Path, tokens_path: Path, warmup: int, steps: int
) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second) of nanoGPT's train.py iteration."""
    torch.manual_seed(0)
    model = nanogpt_model(nanogpt_dir)
    optimizer = model.configure_optimizers(0.1, LR, BETAS, "cpu")
    get_batch = nanogpt_get_batch(tokens_path, SHAPE["block_size"], BATCH, CPU)
    return time_nanogpt_loop(
        model, lambda m, x, y: m(x, y)[1], optimizer, get_batch, warmup, steps, lr=LR
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--nanogpt-dir", type=Path, required=True, help="directory with nanoGPT's model.py"
    )
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import_nanogpt(args.nanogpt_dir)  # exits with the command to get model.py when missing
    logging.getLogger("lmforge").setLevel(logging.WARNING)
    runs: dict[str, list[tuple[float, float]]] = {"nanogpt": [], "lmforge_loop": [], "lmforge": []}
    with tempfile.TemporaryDirectory() as tmp:
        tokens_path = Path(tmp) / "train.bin"
        write_tokens(tokens_path, SHAPE["vocab_size"])
        for r in range(args.rounds):
            runs["nanogpt"].append(
                run_nanogpt(args.nanogpt_dir, tokens_path, args.warmup, args.steps)
            )
            torch.manual_seed(0)
            ng = nanogpt_model(args.nanogpt_dir)
            runs["lmforge_loop"].append(
                run_lmforge(ng, nanogpt_loss, tokens_path, args.warmup, args.steps)
            )
            torch.manual_seed(0)
            runs["lmforge"].append(
                run_lmforge(our_model(), lm_loss, tokens_path, args.warmup, args.steps)
            )
            shown = "  ".join(
                f"{k} {v[-1][0]:,.0f} tok/s ({v[-1][1]:,.0f}/CPU s)" for k, v in runs.items()
            )
            print(f"round {r + 1}: {shown}", flush=True)
    med = {k: [statistics.median(x[i] for x in v) for i in (0, 1)] for k, v in runs.items()}
    result: dict[str, object] = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    for name, (wall, cpu) in med.items():
        result[f"{name}_tokens_per_s"] = round(wall)
        result[f"{name}_tokens_per_cpu_s"] = round(cpu)
    base = med["nanogpt"]
    # lmforge (our model + our loop) vs nanoGPT; and our loop alone (nanoGPT's model in it)
    result["ratio"] = round(med["lmforge"][0] / base[0], 3)
    result["ratio_cpu"] = round(med["lmforge"][1] / base[1], 3)
    result["loop_ratio"] = round(med["lmforge_loop"][0] / base[0], 3)
    result["loop_ratio_cpu"] = round(med["lmforge_loop"][1] / base[1], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
