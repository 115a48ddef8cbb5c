"""Report sections of the data-preparation stages, each from the files its stage wrote.

- data: the funnel (documents and characters in/out of each step) as a table and a bar plot,
  why documents were dropped, augmented rows, demographic term rates per split (the data-side
  bias report) and samples of what was removed (stats.json, samples/);
- tokenizer: vocabulary and compression stats, the longest tokens (stats.json);
- tokens: how many tokens each split holds (meta.json);
- tasks: the built-in task examples per file and their training labels (stats.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.common.plots import pyplot
from lmforge.data.bias_stats import labels_text
from lmforge.evals.report import Block, StageInfo, register_section
from lmforge.evals.report_sections.common import (
    SAMPLE_CHARS,
    clip,
    fmt_num,
    pick,
    read_json,
    read_rows,
    scalars_table,
)


def funnel_steps(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """Normalised funnel rows: name, docs_in, docs_out, chars_in, chars_out, reasons."""
    steps = pick(stats, "steps", "funnel", default=[])
    if isinstance(steps, dict):  # {"clean": {...}, "dedup": {...}}
        steps = [{"name": k, **v} for k, v in steps.items()]
    out = []
    for step in steps:
        out.append(
            {
                "name": pick(step, "name", "step", default="?"),
                "docs_in": pick(step, "documents_in", "docs_in", default=0),
                "docs_out": pick(step, "documents_out", "docs_out", default=0),
                "chars_in": pick(step, "characters_in", "chars_in", default=0),
                "chars_out": pick(step, "characters_out", "chars_out", default=0),
                "reasons": pick(step, "reasons", "drop_reasons", "dropped", default={}) or {},
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
    stats = read_json(stage.path / "stats.json")
    if not isinstance(stats, dict):
        return [Block(text="No stats.json in this data directory.")]
    steps = funnel_steps(stats)
    blocks: list[Block] = []
    if steps:
        first, last = steps[0], steps[-1]
        docs_in = pick(stats, "documents_in", default=first["docs_in"])
        docs_out = pick(stats, "documents_out", default=last["docs_out"])
        kept = docs_out / docs_in if docs_in else 0.0
        text = (
            f"The data pipeline read {fmt_num(docs_in)} documents "
            f"({fmt_num(first['chars_in'])} characters) and kept {fmt_num(docs_out)} "
            f"({kept:.1%}) after {len(steps)} steps"
        )
        rejects = pick(stats, "rejects", default=0)
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
        value = pick(stats, key, default=None)
        if isinstance(value, dict) and value:
            blocks.append(Block(text=f"{key.capitalize()}:", table=scalars_table(value, header)))
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
            text = pick(row, "text", "content", default=json.dumps(row)[:SAMPLE_CHARS])
            rows.append([file.name.split(".")[0], row.get("reason", ""), clip(text)])
    return [Block(text="Samples of removed documents:", table=rows)] if len(rows) > 1 else []


@register_section("tokenizer", headline=False)
def tokenizer_section(stage: StageInfo) -> list[Block]:
    stats = read_json(stage.path / "stats.json")
    if not isinstance(stats, dict):
        return [Block(text="No stats.json in this tokenizer directory.")]
    blocks = []
    vocab, bpt = pick(stats, "vocab_size"), pick(stats, "bytes_per_token")
    if vocab is not None and bpt is not None:
        blocks.append(
            Block(
                text=f"A vocabulary of {fmt_num(vocab)} tokens; on held-out text one token covers "
                f"{fmt_num(bpt)} bytes.",
                summary=True,
            )
        )
    blocks.append(Block(table=scalars_table(stats)))
    longest = pick(stats, "longest_tokens", default=[])
    if longest:
        shown = [
            [i + 1, repr(t if isinstance(t, str) else t[0] if isinstance(t, list) else t)]
            for i, t in enumerate(longest[:15])
        ]
        blocks.append(Block(text="Longest tokens:", table=[["#", "token"], *shown]))
    return blocks


@register_section("tokens", headline=False)
def tokens_section(stage: StageInfo) -> list[Block]:
    meta = read_json(stage.path / "meta.json")
    if not isinstance(meta, dict):
        return [Block(text="No meta.json in this token directory.")]
    counts = meta.get("counts", {}) if isinstance(meta.get("counts"), dict) else {}
    story = ", ".join(f"{fmt_num(n)} {split}" for split, n in counts.items())
    blocks = [Block(text=f"Token shards: {story} tokens ({meta.get('dtype', '?')}).", summary=True)]
    return [*blocks, Block(table=scalars_table(meta, ("field", "value")))]


@register_section("tasks", headline=False)
def tasks_section(stage: StageInfo) -> list[Block]:
    stats = read_json(stage.path / "stats.json")
    if not isinstance(stats, dict):
        return [Block(text="No stats.json in this tasks directory.")]
    counts = pick(stats, "counts", default={})
    story = ", ".join(f"{fmt_num(n)} {name}" for name, n in counts.items())
    blocks = [Block(text=f"Built-in task examples: {story}.", summary=True)]
    blocks.append(Block(table=scalars_table(counts, ("file", "examples"))))
    labels = pick(stats, "train_labels", default={})
    if labels:
        blocks.append(
            Block(text="Training labels:", table=scalars_table(labels, ("label", "examples")))
        )
    return blocks
