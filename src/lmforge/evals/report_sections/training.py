"""Report sections of the training stages: pretrain and finetune.

Train and val loss and throughput from metrics.jsonl and the final numbers (a masked-LM's loss
before and after, a seq2seq fine-tune's text metrics); finetune k-fold with augmentation:
held-out metrics with and without it (mean ± std).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lmforge.common.plots import pyplot
from lmforge.evals.report import Block, StageInfo, register_section
from lmforge.evals.report_sections.common import fmt_num, read_json, read_rows


def _plot_training(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    plt = pyplot()
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r and "step" in r]
    speed = [(r["step"], r["tokens_per_s"]) for r in rows if "tokens_per_s" in r and "step" in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [2, 1]})
    if train:
        axes[0].plot(*zip(*train, strict=True), label="train", linewidth=1)
    if val:
        axes[0].plot(*zip(*val, strict=True), label="val", marker="o", linewidth=1.5)
    axes[0].set(xlabel="step", ylabel="loss (nats/token)", title=title)
    axes[0].grid(alpha=0.3)
    axes[0].legend()
    if speed:
        axes[1].plot(*zip(*speed, strict=True), color="#55a868", linewidth=1)
    axes[1].set(xlabel="step", ylabel="tokens/s", title="throughput")
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def training_section(stage: StageInfo) -> list[Block]:
    rows = read_rows(stage.path / "metrics.jsonl")
    if not rows:
        return [Block(text="No metrics.jsonl in this training directory.")]
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    speeds = [r["tokens_per_s"] for r in rows if isinstance(r.get("tokens_per_s"), (int, float))]
    seen = max((r.get("tokens_seen", 0) for r in rows), default=0)
    summary = [["", "value"], ["steps", fmt_num(max((r.get("step", 0) for r in rows), default=0))]]
    summary.append(["tokens seen", fmt_num(seen)])
    if train:
        summary.append(
            ["first / last train loss", f"{train[0]['loss']:.4f} / {train[-1]['loss']:.4f}"]
        )
    if val:
        best = min(r["val_loss"] for r in val)
        summary.append(["last / best val loss", f"{val[-1]['val_loss']:.4f} / {best:.4f}"])
    if speeds:
        summary.append(["mean tokens/s", fmt_num(sum(speeds) / len(speeds))])
    text = f"Trained for {summary[1][1]} steps on {fmt_num(seen)} tokens"
    if train:
        text += f"; train loss went from {train[0]['loss']:.3f} to {train[-1]['loss']:.3f}"
    if val:
        text += f", validation loss ended at {val[-1]['val_loss']:.3f}"
    text += _mlm_summary(stage.manifest.get("metrics") or {}, summary)
    text += _seq2seq_summary(stage.manifest.get("metrics") or {}, summary)
    plot = _plot_training(rows, stage.asset("loss.png"), f"{stage.name}: loss")
    return [
        Block(text=text + ".", summary=True),
        Block(table=summary),
        Block(image=plot, caption=f"{stage.name} loss and throughput"),
    ]


def _mlm_summary(metrics: dict[str, Any], summary: list[list[str]]) -> str:
    """A masked-LM run's before/after held-out masked-token loss: a table row and a sentence."""
    before, after = metrics.get("initial_val_loss"), metrics.get("val_loss")
    if metrics.get("objective") != "mlm" or before is None or after is None:
        return ""
    ppl = math.exp(min(after, 50.0))
    summary.append(["masked-token val loss before / after", f"{before:.4f} / {after:.4f}"])
    return (
        f" (masked-LM: held-out masked-token loss {before:.3f} before training, {after:.3f} "
        f"after, perplexity {ppl:.1f})"
    )


SEQ2SEQ_METRICS = (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"),
                   ("bleu", "BLEU"), ("exact_match", "exact match"))  # fmt: skip


def _seq2seq_summary(metrics: dict[str, Any], summary: list[list[str]]) -> str:
    """A seq2seq fine-tune's text metrics on val (base -> tuned when the base was scored):
    one table row each and a sentence with ROUGE-L and BLEU."""
    if "rougeL" not in metrics or "exact_match" not in metrics:
        return ""
    for key, name in SEQ2SEQ_METRICS:
        value = fmt_num(metrics.get(key))
        base = metrics.get(f"base_{key}")
        summary.append([f"val {name}", value if base is None else f"{fmt_num(base)} -> {value}"])
    n = metrics.get("eval_examples", "?")
    return (
        f" (seq2seq: on {n} val examples ROUGE-L {fmt_num(metrics['rougeL'])}, BLEU "
        f"{fmt_num(metrics.get('bleu'))}, exact match {fmt_num(metrics['exact_match'])})"
    )


register_section("pretrain", replaces=("loss.png",))(training_section)


def augment_compare_blocks(stage_dir: Path) -> list[Block]:
    """finetune k-fold with augment.compare: the same folds with and without augmentation."""
    compare = read_json(stage_dir / "folds" / "augment_compare.json")
    if not isinstance(compare, dict):
        return []
    with_, without = compare["with"], compare["without"]
    metrics = [k[3:-5] for k in with_ if k.startswith("cv_") and k.endswith("_mean")]
    table = [["metric (held-out fold)", "without augmentation", "with augmentation"]]
    for m in metrics:
        cell = lambda s, m=m: f"{s[f'cv_{m}_mean']:.4g} ± {s[f'cv_{m}_std']:.2g}"  # noqa: E731
        table.append([m, cell(without), cell(with_)])
    acc = "accuracy" if "accuracy" in metrics else metrics[0]
    delta = with_[f"cv_{acc}_mean"] - without[f"cv_{acc}_mean"]
    text = (
        f"Augmentation ({', '.join(compare['methods'])}, alpha {compare['alpha']}, "
        f"{compare['copies']} copies) over {compare['k']} folds: held-out {acc} "
        f"{without[f'cv_{acc}_mean']:.3f} ± {without[f'cv_{acc}_std']:.3f} without, "
        f"{with_[f'cv_{acc}_mean']:.3f} ± {with_[f'cv_{acc}_std']:.3f} with ({delta:+.3f}); "
        "each fold augmented only its own training part."
    )
    return [Block(text=text, summary=True), Block(table=table)]


@register_section("finetune", replaces=("loss.png",))
def finetune_section(stage: StageInfo) -> list[Block]:
    return training_section(stage) + augment_compare_blocks(stage.path)
