"""Stage-specific parts of the run report, one builder per stage kind (see report.SECTIONS).

Each builder reads only what its stage left on disk and tells that stage's part of the story in
a sentence, a table and a plot:

- data: the funnel (documents and characters in/out of each step) as a table and a bar plot,
  why documents were dropped, augmented rows, demographic term rates per split (the data-side
  bias report) and samples of what was removed (stats.json, samples/);
- tokenizer: vocabulary and compression stats, the longest tokens (stats.json);
- tokens: how many tokens each split holds (meta.json);
- pretrain / finetune: train and val loss and throughput from metrics.jsonl, final numbers;
  finetune k-fold with augmentation: held-out metrics with and without it (mean ± std);
- align: the method's headline (pairwise accuracy, DPO margins and ROUGE-L, PPO reward and KL)
  before the same training curves;
- compress: size, decode speed and perplexity of the original and each variant, and a
  quality-vs-size plot (compression.json);
- eval: the model-by-task comparison, per-task tables, confusion matrices, a dozen generation
  samples (best and worst) and the worst errors (eval.json, generations.jsonl, errors.jsonl).

Builders are tolerant: a missing or differently shaped file yields a short note, never a crash,
because a report of a half-finished run is still worth reading.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lmforge.common.io import read_jsonl
from lmforge.common.plots import pyplot
from lmforge.data.bias_stats import labels_text
from lmforge.evals.report import Block, StageInfo, register_section

SAMPLE_CHARS = 300  # characters of each sample shown in tables


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def read_rows(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for row in read_jsonl(path):
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    return rows


def clip(text: Any, n: int = SAMPLE_CHARS) -> str:
    text = str(text)
    return text if len(text) <= n else text[:n] + "…"


def fmt_num(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def _pick(row: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """The first of several accepted spellings of a field (documents_in / docs_in ...)."""
    for key in keys:
        if key in row:
            return row[key]
    return default


def _scalars_table(data: dict[str, Any], header: tuple[str, str] = ("stat", "value")) -> list:
    rows: list[list[Any]] = [list(header)]
    for key, value in data.items():
        if isinstance(value, dict):
            rows += [
                [f"{key}.{k}", fmt_num(v)]
                for k, v in value.items()
                if not isinstance(v, (dict, list))
            ]
        elif not isinstance(value, list):
            rows.append([key, fmt_num(value)])
    return rows


# -- data --------------------------------------------------------------------------------------


def funnel_steps(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """Normalised funnel rows: name, docs_in, docs_out, chars_in, chars_out, reasons."""
    steps = _pick(stats, "steps", "funnel", default=[])
    if isinstance(steps, dict):  # {"clean": {...}, "dedup": {...}}
        steps = [{"name": k, **v} for k, v in steps.items()]
    out = []
    for step in steps:
        out.append(
            {
                "name": _pick(step, "name", "step", default="?"),
                "docs_in": _pick(step, "documents_in", "docs_in", default=0),
                "docs_out": _pick(step, "documents_out", "docs_out", default=0),
                "chars_in": _pick(step, "characters_in", "chars_in", default=0),
                "chars_out": _pick(step, "characters_out", "chars_out", default=0),
                "reasons": _pick(step, "reasons", "drop_reasons", "dropped", default={}) or {},
            }
        )
    return out


def _plot_funnel(steps: list[dict[str, Any]], path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    names = [s["name"] for s in steps]
    for ax, key, label in ((axes[0], "docs", "documents"), (axes[1], "chars", "characters")):
        values = [steps[0][f"{key}_in"]] + [s[f"{key}_out"] for s in steps] if steps else []
        bars = ax.bar(range(len(values)), values, color="#4c72b0")
        ax.bar_label(bars, labels=[fmt_num(v) for v in values], fontsize=6, rotation=90, padding=2)
        ax.margins(y=0.25)  # room for the rotated labels
        ax.ticklabel_format(axis="y", style="plain")
        ax.set_xticks(range(len(values)), ["input", *names], rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{label} after each step", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@register_section("data")
def data_section(stage: StageInfo) -> list[Block]:
    stats = _json(stage.path / "stats.json")
    if not isinstance(stats, dict):
        return [Block(text="No stats.json in this data directory.")]
    steps = funnel_steps(stats)
    blocks: list[Block] = []
    if steps:
        first, last = steps[0], steps[-1]
        docs_in = _pick(stats, "documents_in", default=first["docs_in"])
        docs_out = _pick(stats, "documents_out", default=last["docs_out"])
        kept = docs_out / docs_in if docs_in else 0.0
        text = (
            f"The data pipeline read {fmt_num(docs_in)} documents "
            f"({fmt_num(first['chars_in'])} characters) and kept {fmt_num(docs_out)} "
            f"({kept:.1%}) after {len(steps)} steps"
        )
        rejects = _pick(stats, "rejects", default=0)
        text += f"; {fmt_num(rejects)} unreadable records were rejected." if rejects else "."
        blocks.append(Block(text=text, summary=True))
        table = [["step", "docs in", "docs out", "dropped", "chars in", "chars out"]]
        table += [
            [s["name"], fmt_num(s["docs_in"]), fmt_num(s["docs_out"]), fmt_num(s["docs_in"] - s["docs_out"]),
             fmt_num(s["chars_in"]), fmt_num(s["chars_out"])]
            for s in steps
        ]  # fmt: skip
        blocks.append(Block(table=table))
        blocks.append(
            Block(image=_plot_funnel(steps, stage.asset("funnel.png")), caption="data funnel")
        )
        reasons = [[s["name"], r, fmt_num(n)] for s in steps for r, n in s["reasons"].items()]
        if reasons:
            blocks.append(
                Block(
                    text="Why documents were dropped:",
                    table=[["step", "reason", "documents"], *reasons],
                )
            )
    for key, header in (("splits", ("split", "documents")), ("pii", ("PII kind", "replaced"))):
        value = _pick(stats, key, default=None)
        if isinstance(value, dict) and value:
            blocks.append(Block(text=f"{key.capitalize()}:", table=_scalars_table(value, header)))
    blocks += _augment_blocks(stats.get("augment")) + _bias_blocks(stats.get("bias"))
    blocks += _removed_samples(stage.path)
    return blocks


def _augment_blocks(augment: Any) -> list[Block]:
    if not isinstance(augment, dict) or not augment.get("rows"):
        return []
    rows = [["method", "augmented train rows"]]
    rows += [[k, fmt_num(v)] for k, v in augment["rows"].items()]
    text = (
        f"Augmentation added {fmt_num(sum(augment['rows'].values()))} rows to train only "
        f"(synonyms: {augment.get('synonyms') or 'not used'}); val and test hold originals."
    )
    return [Block(text=text, table=rows)]


def _bias_blocks(bias: Any) -> list[Block]:
    """Term frequencies per split and group: rates per 1k words, their ratio, labels, examples."""
    if not isinstance(bias, dict) or not bias:
        return []
    table = [["split", "group", "side 0 (per 1k words)", "side 1 (per 1k words)", "ratio 0/1",
              "rows by label"]]  # fmt: skip
    examples = [["group", "side", "example"]]
    for split, rep in bias.items():
        for name, g in rep.get("groups", {}).items():
            (s0, a), (s1, b) = g["sides"].items()
            table.append([split, name, f"{s0} {a['count']} ({a['per_1k_words']:.3g})",
                          f"{s1} {b['count']} ({b['per_1k_words']:.3g})",
                          fmt_num(g["ratio"]) if g["ratio"] is not None else "-",
                          clip(labels_text(g), 120)])  # fmt: skip
            if split == "train":
                examples += [[name, side, clip(d["examples"][0], 120)]
                             for side, d in g["sides"].items() if d.get("examples")]  # fmt: skip
    blocks = [Block(text="Demographic terms in the data (data-side bias report):", table=table)]
    if len(examples) > 1:
        blocks.append(Block(text="Where the terms occur (train):", table=examples))
    return blocks


def _removed_samples(stage_dir: Path, per_file: int = 2) -> list[Block]:
    files = (
        sorted((stage_dir / "samples").glob("*.jsonl*")) if (stage_dir / "samples").is_dir() else []
    )
    rows = [["step", "reason", "text"]]
    for file in files:
        for row in read_rows(file, per_file):
            text = _pick(row, "text", "content", default=json.dumps(row)[:SAMPLE_CHARS])
            rows.append([file.name.split(".")[0], row.get("reason", ""), clip(text)])
    return [Block(text="Samples of removed documents:", table=rows)] if len(rows) > 1 else []


# -- tokenizer and tokens ----------------------------------------------------------------------


@register_section("tokenizer", headline=False)
def tokenizer_section(stage: StageInfo) -> list[Block]:
    stats = _json(stage.path / "stats.json")
    if not isinstance(stats, dict):
        return [Block(text="No stats.json in this tokenizer directory.")]
    blocks = []
    vocab, bpt = _pick(stats, "vocab_size"), _pick(stats, "bytes_per_token")
    if vocab is not None and bpt is not None:
        blocks.append(
            Block(
                text=f"A vocabulary of {fmt_num(vocab)} tokens; on held-out text one token covers "
                f"{fmt_num(bpt)} bytes.",
                summary=True,
            )
        )
    blocks.append(Block(table=_scalars_table(stats)))
    longest = _pick(stats, "longest_tokens", default=[])
    if longest:
        shown = [
            [i + 1, repr(t if isinstance(t, str) else t[0] if isinstance(t, list) else t)]
            for i, t in enumerate(longest[:15])
        ]
        blocks.append(Block(text="Longest tokens:", table=[["#", "token"], *shown]))
    return blocks


@register_section("tokens", headline=False)
def tokens_section(stage: StageInfo) -> list[Block]:
    meta = _json(stage.path / "meta.json")
    if not isinstance(meta, dict):
        return [Block(text="No meta.json in this token directory.")]
    counts = meta.get("counts", {}) if isinstance(meta.get("counts"), dict) else {}
    story = ", ".join(f"{fmt_num(n)} {split}" for split, n in counts.items())
    blocks = [Block(text=f"Token shards: {story} tokens ({meta.get('dtype', '?')}).", summary=True)]
    return [*blocks, Block(table=_scalars_table(meta, ("field", "value")))]


@register_section("tasks", headline=False)
def tasks_section(stage: StageInfo) -> list[Block]:
    stats = _json(stage.path / "stats.json")
    if not isinstance(stats, dict):
        return [Block(text="No stats.json in this tasks directory.")]
    counts = _pick(stats, "counts", default={})
    story = ", ".join(f"{fmt_num(n)} {name}" for name, n in counts.items())
    blocks = [Block(text=f"Built-in task examples: {story}.", summary=True)]
    blocks.append(Block(table=_scalars_table(counts, ("file", "examples"))))
    labels = _pick(stats, "train_labels", default={})
    if labels:
        blocks.append(
            Block(text="Training labels:", table=_scalars_table(labels, ("label", "examples")))
        )
    return blocks


# -- training ----------------------------------------------------------------------------------


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
    compare = _json(stage_dir / "folds" / "augment_compare.json")
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


# -- tune --------------------------------------------------------------------------------------

TUNE_ROWS = 20  # trials shown in the report's table, best first


@register_section("tune", headline=False)
def tune_section(stage: StageInfo) -> list[Block]:
    """The best trial in a sentence, the best trials in a table, history and importance plots."""
    results = _json(stage.path / "trials.json")
    if not isinstance(results, dict) or not results.get("trials"):
        return [Block(text="No trials.json in this tune directory.")]
    rows, best = results["trials"], results.get("best")
    objective = results.get("objective", "value")
    states = [r.get("state") for r in rows]
    counts = ", ".join(f"{states.count(s)} {s.lower()}" for s in ("COMPLETE", "PRUNED", "FAIL"))
    text = f"Searched {len(rows)} trials of {results.get('stage', '?')} ({counts}) with the "
    text += f"{results.get('sampler', '?')} sampler and {results.get('pruner', '?')} pruning"
    if best:
        params = ", ".join(f"{k}={fmt_num(v)}" for k, v in best["params"].items())
        text += f"; the best, trial {best['number']}, reached {objective} {fmt_num(best['value'])}"
        text += f" with {params}"
    blocks = [Block(text=text + ".", summary=True)]
    keys = sorted({k for r in rows for k in r if k.startswith("params.")})
    reverse = results.get("direction") == "maximize"
    valued = sorted((r for r in rows if r.get("value") is not None), key=lambda r: r["value"],
                    reverse=reverse)  # fmt: skip
    shown = (valued + [r for r in rows if r.get("value") is None])[:TUNE_ROWS]
    table = [["trial", "state", objective, *(k.removeprefix("params.") for k in keys), "steps"]]
    for r in shown:
        table.append([r["number"], r["state"], fmt_num(r.get("value")),
                      *(fmt_num(r.get(k, "")) for k in keys), r.get("last_step") or ""])  # fmt: skip
    more = f" (best {TUNE_ROWS} of {len(rows)})" if len(rows) > TUNE_ROWS else ""
    blocks.append(Block(text=f"Trials by {objective}{more}:", table=table))
    for name, caption in (
        ("optimization_history.png", f"{objective} of each trial and the best so far"),
        ("param_importance.png", "parameter importance (fANOVA)"),
    ):
        if (stage.path / name).is_file():
            blocks.append(Block(image=stage.path / name, caption=caption))
    if not results.get("importance"):
        blocks.append(Block(text="Parameter importance needs at least two complete trials."))
    return blocks


def _align_summary(method: str, m: dict[str, Any]) -> str:
    """The headline of an align stage in one sentence, by method (manifest metrics)."""
    if method == "reward" and "val_pair_accuracy" in m:
        return (f"Reward model: held-out pairwise accuracy {fmt_num(m['val_pair_accuracy'])} "
                f"(untrained head {fmt_num(m.get('base_val_pair_accuracy'))}).")  # fmt: skip
    if method == "dpo" and "val_logp_margin" in m:
        text = (f"DPO: held-out chosen-over-rejected log-prob margin {fmt_num(m['ref_logp_margin'])}"
                f" -> {fmt_num(m['val_logp_margin'])}, preference accuracy "
                f"{fmt_num(m['val_pref_accuracy'])}")  # fmt: skip
        if "rouge_l" in m:
            text += f"; ROUGE-L {fmt_num(m['ref_rouge_l'])} -> {fmt_num(m['rouge_l'])}"
        return text + "."
    if method == "ppo" and "val_reward" in m:
        gain = ""
        if "val_reward_gain_se" in m:  # paired by prompt
            gain = (f" (gain {fmt_num(m['val_reward_gain'])} +- "
                    f"{fmt_num(m['val_reward_gain_se'])} s.e.)")  # fmt: skip
        return (f"PPO: mean reward of held-out answers {fmt_num(m['val_reward_before'])} -> "
                f"{fmt_num(m['val_reward'])}{gain}, KL to the reference {fmt_num(m['val_kl'])} "
                "nats per answer.")  # fmt: skip
    return ""


@register_section("align", replaces=("loss.png",))
def align_section(stage: StageInfo) -> list[Block]:
    """The method's headline sentence, then the training curves (for PPO val_loss is -reward)."""
    blocks = training_section(stage)
    config = stage.manifest.get("config", {})
    text = _align_summary(config.get("method", ""), stage.manifest.get("metrics", {}))
    if not text:
        return blocks
    blocks[0].summary = False
    return [Block(text=text, summary=True), *blocks]

    return blocks


# -- compress ----------------------------------------------------------------------------------


def compression_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The variants compression.json measured: the original, the result, and the extras
    (dynamic int8 in memory; each exported file), each with what was measured for it."""
    method = report.get("method", "?")
    first = "teacher (fp32)" if method == "distill" else "original (fp32)"
    rows = [{"variant": first, **(report.get("before") or {})}]
    if method == "quantize":
        scheme = (report.get("quantization") or {}).get("scheme", "quantized")
        rows.append({"variant": f"{scheme} weight-only", **(report.get("after") or {})})
        if report.get("dynamic_int8"):
            rows.append({"variant": "dynamic int8 (in memory)", **report["dynamic_int8"]})
    if method == "prune":
        p = report.get("pruning") or {}
        label = f"{p.get('kind', '?')} pruned {p.get('target', '?')}"
        if report.get("before_recovery"):
            rows.append({"variant": f"{label}, before recovery", **report["before_recovery"]})
            label += f", recovered {(report.get('recovery') or {}).get('steps', '?')} steps"
        rows.append({"variant": label, **(report.get("after") or {})})
    if method == "distill":
        d = report.get("distillation") or {}
        label = f"student {d.get('student', '?')} ({fmt_num(d.get('student_params'))} params)"
        rows.append({"variant": label, **(report.get("after") or {})})
    if report.get("onnx"):
        rows.append({"variant": "ONNX (onnxruntime)", **report["onnx"]})
    if report.get("gguf"):  # compression.json before export.gguf_type: always f32
        rows.append({"variant": f"GGUF {report['gguf'].get('file_type', 'f32')}", **report["gguf"]})
    return rows


def _plot_tradeoff(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Perplexity against megabytes on disk, each point labelled with its decode tokens/s."""
    points = [r for r in rows if r.get("perplexity") is not None and r.get("weights_bytes")]
    if len(points) < 2:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r in points:
        mb = r["weights_bytes"] / 1e6
        ax.scatter(mb, r["perplexity"], s=40)
        ax.annotate(f"{r['variant']}\n{r.get('tokens_per_s', 0):.0f} tok/s", (mb, r["perplexity"]),
                    fontsize=8, textcoords="offset points", xytext=(5, 5))  # fmt: skip
    ax.set_xlabel("weights on disk (MB)")
    ax.set_ylabel("val perplexity")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_title("quality vs size (labels: greedy decode speed)")
    ax.margins(0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@register_section("compress", headline=False)
def compress_section(stage: StageInfo) -> list[Block]:
    """What compression bought: size, speed and quality of each variant, and the plot."""
    report = _json(stage.path / "compression.json")
    if not isinstance(report, dict) or not report.get("before"):
        return [Block(text="No compression.json in this compress directory.")]
    rows = compression_rows(report)
    base = rows[0]
    text = f"{report.get('method', '?')} of {Path(str(report.get('source', '?'))).parent.name}/"
    text += f"{Path(str(report.get('source', '?'))).name}: "
    parts = []
    for r in rows[1:]:
        bits = []
        if r.get("weights_bytes"):
            bits.append(f"{r['weights_bytes'] / max(base['weights_bytes'], 1):.2f}x the size")
        if r.get("tokens_per_s"):
            bits.append(f"{r['tokens_per_s'] / max(base['tokens_per_s'], 1e-9):.2f}x the speed")
        if r.get("perplexity") is not None and base.get("perplexity"):
            bits.append(f"perplexity {100 * (r['perplexity'] / base['perplexity'] - 1):+.2f}%")
        if r.get("decode_max_abs_diff") is not None:
            diff = max(r["prefill_max_abs_diff"], r["decode_max_abs_diff"])
            bits.append(f"logits within {diff:.1e}")
        if r.get("max_abs_logit_diff") is not None:  # GGUF: the file's rounded weights
            bits.append(f"logits within {r['max_abs_logit_diff']:.1e}")
        parts.append(f"{r['variant']} " + ", ".join(bits))
    blocks = [Block(text=text + "; ".join(parts) + ".", summary=True)]
    table = [["variant", "MB", "size", "tokens/s", "speed", "perplexity", "bits/byte"]]
    for r in rows:
        size = r.get("weights_bytes")
        tps = r.get("tokens_per_s")
        table.append([
            r["variant"],
            f"{size / 1e6:.2f}" if size else "",
            f"{size / max(base['weights_bytes'], 1):.2f}x" if size else "",
            f"{tps:.0f}" if tps else "",
            f"{tps / max(base['tokens_per_s'], 1e-9):.2f}x" if tps else "",
            fmt_num(r.get("perplexity", "")),
            fmt_num(r.get("bits_per_byte", "")),
        ])  # fmt: skip
    blocks.append(Block(text="Trade-offs (greedy decode with a KV cache, this machine):",
                        table=table))  # fmt: skip
    plot = _plot_tradeoff(rows, stage.asset("tradeoff.png"))
    if plot:
        blocks.append(Block(image=plot, caption="quality vs size vs speed"))
    return blocks


# -- dialogue (multi-task seq2seq responder + intent head) ---------------------------------------

DIALOGUE_SAMPLES = 8  # held-out responses shown


@register_section("dialogue", replaces=("loss.png",))
def dialogue_section(stage: StageInfo) -> list[Block]:
    """Training curves, then held-out responses (ROUGE-L) and intents (accuracy, macro-F1)."""
    scores = _json(stage.path / "eval.json")
    if not isinstance(scores, dict):
        return [*training_section(stage), Block(text="No eval.json in this dialogue stage.")]
    text = (
        f"On {scores['test_responses']} held-out dialogues about unseen functions the responder "
        f"scores ROUGE-L {scores['test_rougeL']:.3f}, BLEU {scores['test_bleu']:.1f} (exact match "
        f"{scores['test_exact_match']:.3f});"
        f" its intent head is right on {scores['intent_accuracy']:.1%} of "
        f"{scores['intent_test_dialogues']} (macro-F1 {scores['intent_macro_f1']:.3f}; always "
        f"guessing the commonest intent: {scores['intent_majority_accuracy']:.1%})."
    )
    shown = ("test_rouge1", "test_rouge2", "test_rougeL", "test_bleu", "test_exact_match", "intent_accuracy", "intent_macro_f1",
             "intent_majority_accuracy")  # fmt: skip
    table = [["metric (held-out test)", "value"], *([k, f"{scores[k]:.4g}"] for k in shown)]
    rows = [["user", "reference", "response", "intent (predicted)"]]
    samples_path = stage.path / "samples.jsonl"
    if samples_path.exists():
        for line in samples_path.read_text(encoding="utf-8").splitlines()[:DIALOGUE_SAMPLES]:
            s = json.loads(line)
            rows.append([s["context"], s["reference"], s["prediction"],
                         f"{s['intent']} ({s['predicted_intent']})"])  # fmt: skip
    return [
        *training_section(stage),
        Block(text=text, summary=True),
        Block(table=table),
        *_retrieval_blocks(scores),
        Block(table=rows, caption="held-out dialogues"),
    ]


def _retrieval_blocks(scores: dict[str, Any]) -> list[Block]:
    """A retrieval-augmented responder: recall@k and per-intent scores with/without passages."""
    retrieval = scores.get("retrieval")
    if not retrieval:
        return []
    k, recall = retrieval["passages"], retrieval["recall_at_k"]
    text = (f"Each source carries the top {k} knowledge-base passages for the user turn; the "
            f"asked-about function's passage is among them for {recall.get('all', 0):.1%} of the "
            f"held-out questions about a function (recall@{k}).")  # fmt: skip
    plain = scores.get("without_retrieval")
    if plain is None:
        return [Block(text=text)]
    text += (f" Trained the same way without passages, the responder scores ROUGE-L "
             f"{plain['test_rougeL']:.3f} (with: {scores['test_rougeL']:.3f}).")  # fmt: skip
    table = [["intent", "n", f"recall@{k}", "ROUGE-L with / without passages",
              "BLEU with / without", "exact match with / without"]]  # fmt: skip
    for intent, row in scores["per_intent"].items():
        other = plain["per_intent"].get(intent, {})
        cells = [f"{row[m]:.3g} / {other.get(m, float('nan')):.3g}"
                 for m in ("rougeL", "bleu", "exact_match")]  # fmt: skip
        r = recall.get(intent)
        table.append([intent, str(row["n"]), "" if r is None else f"{r:.3f}", *cells])
    caption = (f"held-out, with vs without passages (n: responses scored; recall@{k}: every test "
               "dialogue about a function)")  # fmt: skip
    return [Block(text=text), Block(table=table, caption=caption)]
