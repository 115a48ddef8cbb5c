"""DPO: lmforge's align pieces vs TRL's DPOTrainer, same model, data and settings, in one run.

Both start from the same Hugging Face model directory (default: a quickstart's SFT model) and
train sigmoid DPO for --steps optimizer steps of --batch pairs from the built-in preference pairs
(`lmforge preferences`), beta 0.1, AdamW at a constant lr without warmup or weight decay, grad
clip 1, fp32 on the CPU. lmforge runs its real path: pairs encoded by align.encode, reference
log-probs scored once (align.dpo.reference_logps), then the one training loop with the DPO
loss_fn. TRL runs DPOTrainer with its default frozen reference copy (scored per batch). Timed:
the reference scoring plus all training steps for lmforge, trainer.train() for TRL (tokenizing
is untimed for both). Then both final models are scored by the same evaluator on the same
held-out pairs against the starting model's log-probs: implicit-reward preference accuracy and the
chosen-over-rejected log-prob margin.

    python benchmarks/bench_dpo.py --model runs/quickstart/sft/final --prefs runs/align/prefs
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from lmforge.align.dpo import evaluate_dpo, make_dpo_loss, reference_logps
from lmforge.align.encode import encode_pairs
from lmforge.align.prefs import load_pairs
from lmforge.artifacts import StageContext
from lmforge.common.logging import MetricsWriter
from lmforge.finetune.sft import load_chat_tokenizer
from lmforge.model.convert import load_pretrained
from lmforge.train.config import TrainConfig
from lmforge.train.loader import RowBatches
from lmforge.train.loop import train


def run_lmforge(
    model_dir: Path, pairs: list, args: argparse.Namespace
) -> tuple[float, torch.nn.Module]:
    tok = load_chat_tokenizer(model_dir)
    rows, _, _ = encode_pairs(tok, pairs, args.seq_len)
    lm = load_pretrained(model_dir).train()
    tc = TrainConfig(
        max_steps=args.steps, lr=args.lr, micro_batch_size=args.batch, seq_len=args.seq_len,
        warmup_steps=0, schedule="constant", weight_decay=0.0, betas=(0.9, 0.999),
        eval_every=0, ckpt_every=0, log_every=args.steps, device="cpu",
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        ctx = StageContext(
            Path(tmp), "bench", logging.getLogger("bench"), MetricsWriter(Path(tmp) / "m.jsonl")
        )
        t0 = time.perf_counter()
        rows["ref_logps"] = reference_logps(lm, rows, args.batch)
        loader = RowBatches(rows, args.batch, seed=0)
        result = train(
            lm.train(), make_dpo_loss(args.beta, "sigmoid"), loader, tc, ctx, resume=False
        )
        wall = time.perf_counter() - t0
        ctx.metrics.close()
    return args.steps / wall, result.model


def run_trl(
    model_dir: Path, pairs: list, args: argparse.Namespace, out: Path
) -> tuple[float, torch.nn.Module]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    data = Dataset.from_list([
        {"prompt": p["prompt"], "chosen": [{"role": "assistant", "content": p["chosen"]}],
         "rejected": [{"role": "assistant", "content": p["rejected"]}]}
        for p in pairs
    ])  # fmt: skip
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = DPOConfig(
        output_dir=str(out / "trl"), per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=args.lr, beta=args.beta, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, logging_steps=args.steps, report_to="none",
        save_strategy="no", use_cpu=True, max_length=args.seq_len, seed=0,
        dataloader_num_workers=0,
    )  # fmt: skip
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    trainer.model.save_pretrained(out / "trl_final")
    return args.steps / wall, load_pretrained(out / "trl_final")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("runs/quickstart/sft/final"))
    parser.add_argument("--prefs", type=Path, default=Path("runs/align-quickstart/prefs"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--val-pairs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = load_pairs(args.prefs / "prefs_train.jsonl")[: args.steps * args.batch]
    val = load_pairs(args.prefs / "prefs_val.jsonl")[: args.val_pairs]
    tok = load_chat_tokenizer(args.model)
    val_rows, _, _ = encode_pairs(tok, val, args.seq_len)
    val_rows["ref_logps"] = reference_logps(load_pretrained(args.model), val_rows, 32)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in (
            ("lmforge", run_lmforge),
            ("trl", lambda m, p, a: run_trl(m, p, a, Path(tmp))),
        ):
            torch.manual_seed(0)
            steps_per_s, model = run(args.model, pairs, args)
            scores = evaluate_dpo(model.eval(), val_rows, 32, args.beta, "sigmoid")
            results[name] = {"steps_per_s": steps_per_s, **scores}
    print(
        f"{'':10} {'steps/s':>8} {'val pref acc':>13} {'val logp margin':>16}  (reference margin {results['lmforge']['ref_logp_margin']:.2f})"
    )
    for name, r in results.items():
        print(
            f"{name:10} {r['steps_per_s']:8.3f} {r['val_pref_accuracy']:13.3f} {r['val_logp_margin']:16.2f}"
        )
    ratio = results["lmforge"]["steps_per_s"] / results["trl"]["steps_per_s"]
    print(f"{'ratio':10} {ratio:7.2f}x")
    print(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}))


if __name__ == "__main__":
    main()
