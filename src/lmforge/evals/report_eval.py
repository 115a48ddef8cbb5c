"""The eval stage's part of the run report: which model is better at what, and how they fail.

Reads eval.json, generations.jsonl and errors.jsonl of an eval stage directory and shows, in
order: the headline comparison (one row per model, one column per task), each task's full
metrics (with how each model scored: causal, pseudo_log_likelihood, conditional or its head; an
entity table per type for tagging), the comparison and confusion plots, the counterfactual bias gaps per group, a dozen
generation samples (the best and the worst by ROUGE-L) and the worst errors of the other tasks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.evals.report import Block, StageInfo, register_section
from lmforge.evals.report_sections.common import clip, fmt_num, read_rows

N_SAMPLES = 12  # generation samples shown: half the best, half the worst
ERRORS_SHOWN = 3  # worst errors shown per model and task
HIDDEN = {"n", "tokens", "bytes", "documents"}  # counts, shown once in the task line


def _metric_names(per_model: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for metrics in per_model:
        for key, value in metrics.items():
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if is_number and key not in HIDDEN and key not in names:
                names.append(key)
    return names


def _scoring_note(metrics: dict[str, Any]) -> str:
    """How a cell was scored when it is not a causal LM's log-likelihood (pseudo-log-likelihood
    perplexities must never pass for causal ones)."""
    scoring = metrics.get("scoring") or metrics.get("reference_scoring")
    return f" [{scoring}]" if isinstance(scoring, str) and scoring != "causal" else ""


def headline_table(report: dict[str, Any]) -> list[list[Any]]:
    """Models x tasks, each cell the task's headline metric (baseline beside perplexity) and,
    unless causal, how it was scored."""
    header = ["model", "family"]
    for task in report["tasks"]:
        arrow = "↑" if task["higher_is_better"] else "↓"
        header.append(f"{task['name']}: {task['main_metric']} {arrow}")
    rows = [header]
    for model in report["models"]:
        row = [model["name"], model.get("family", "causal")]
        for task in report["tasks"]:
            metrics = report["results"][model["name"]][task["name"]]
            cell = fmt_num(metrics.get(task["main_metric"]))
            if "unigram_bits_per_byte" in metrics:
                cell += f" (unigram {fmt_num(metrics['unigram_bits_per_byte'])})"
            row.append(cell + _scoring_note(metrics))
        rows.append(row)
    return rows


def task_blocks(report: dict[str, Any], task: dict[str, Any]) -> list[Block]:
    models = [m["name"] for m in report["models"]]
    per_model = [report["results"][m][task["name"]] for m in models]
    names = _metric_names(per_model)
    scorings = [r.get("scoring") or r.get("reference_scoring") or "" for r in per_model]
    label = ["scoring"] if any(isinstance(x, str) and x for x in scorings) else []
    table = [["model", *label, *names]] + [
        [m, *([str(sc)] if label else []), *(fmt_num(r.get(k, "")) for k in names)]
        for m, r, sc in zip(models, per_model, scorings, strict=True)
    ]
    count = next((per_model[0][k] for k in ("n", "documents") if k in per_model[0]), None)
    text = f"{task['name']} ({task['type']}"
    text += f", {fmt_num(count)} examples)" if count is not None else ")"
    first = per_model[0]
    if "bleu_signature" in first:
        text += f"; BLEU signature {first['bleu_signature']}"
    if isinstance(first.get("generation"), dict):
        text += "; generation " + json.dumps(first["generation"])
    blocks = [Block(text=text + code_note(models, per_model), table=table)]
    for m, r in zip(models, per_model, strict=True):
        if isinstance(r.get("per_type"), dict):  # tagging: seqeval's per-entity-type report
            rows = [["entity type", "precision", "recall", "f1", "support"]]
            rows += [[k, *(fmt_num(v[c]) for c in ("precision", "recall", "f1", "support"))]
                     for k, v in r["per_type"].items()]  # fmt: skip
            blocks.append(Block(text=f"{m} on {task['name']}: entities per type", table=rows))
    return blocks


def code_note(models: list[str], per_model: list[dict[str, Any]]) -> str:
    """A code task's program statuses per model and the pass@k it could not compute."""
    notes = [
        f"{m}: " + ", ".join(f"{n} {s}" for s, n in r["status_counts"].items())
        + (f" ({r['skipped']})" if "skipped" in r else "")
        for m, r in zip(models, per_model, strict=True)
        if isinstance(r.get("status_counts"), dict)
    ]  # fmt: skip
    return f"; programs {'; '.join(notes)}" if notes else ""


def generation_samples(rows: list[dict[str, Any]], n: int = N_SAMPLES) -> list[dict[str, Any]]:
    """The n/2 best and n/2 worst generations by ROUGE-L (all of them when there are fewer)."""
    ranked = sorted(rows, key=lambda r: -float(r.get("rougeL", 0.0)))
    if len(ranked) <= n:
        return ranked
    return ranked[: n // 2] + ranked[-(n - n // 2) :]


def _samples_block(stage_dir: Path) -> list[Block]:
    picked = generation_samples(read_rows(stage_dir / "generations.jsonl"))
    if not picked:
        return []
    table = [["model", "task", "ROUGE-L", "prompt", "reference", "output"]]
    table += [
        [r["model"], r["task"], f"{r['rougeL']:.3f}", clip(r["prompt"], 200),
         clip(r["reference"], 200), clip(r["output"], 200)]
        for r in picked
    ]  # fmt: skip
    return [Block(text="Generation samples, best first and worst last (by ROUGE-L):", table=table)]


def _errors_block(stage_dir: Path) -> list[Block]:
    rows = [
        r
        for r in read_rows(stage_dir / "errors.jsonl")
        if r.get("type") not in ("generation", "counterfactual")
        and r.get("rank", 1) <= ERRORS_SHOWN
    ]
    if not rows:
        return []
    table = [["model", "task", "why", "score", "input", "expected", "got"]]
    for r in rows:
        if r["type"] == "multiple_choice":
            expected, got = r["choices"][r["gold"]], r["choices"][r["predicted"]]
        elif r["type"] == "code":
            expected, got = "passes its tests", clip(f"{r['status']}: {r['detail']}", 200)
        else:
            expected, got = r.get("label", ""), r.get("predicted", "")
        text = r.get("text", r.get("prompt", ""))
        table.append(
            [
                r["model"],
                r["task"],
                r["reason"],
                fmt_num(r["score"]),
                clip(text, 200),
                expected,
                got,
            ]
        )
    return [Block(text="The worst errors (all of them are in errors.jsonl):", table=table)]


def bias_blocks(report: dict[str, Any], plots: Path) -> list[Block]:
    """Counterfactual tasks: the gap per group and model, the plot, the worst swapped pairs."""
    tasks = [t for t in report["tasks"] if t["type"] == "counterfactual"]
    if not tasks:
        return []
    gaps = [["model", "task", "group (side 0 / side 1)", "n", "mean gap ± std", "mean |gap|"]]
    worst = [["model", "task", "group", "gap", "side 0 text", "side 1 text"]]
    for task in tasks:
        for model in report["models"]:
            metrics = report["results"][model["name"]][task["name"]]
            for group, g in metrics.get("groups", {}).items():
                spread = f"{g['mean_gap']:+.4f} ± {g['std_gap']:.4f}" if g["n"] else "-"
                gaps.append([model["name"], task["name"], f"{group} ({' / '.join(g['sides'])})",
                             fmt_num(g["n"]), spread, fmt_num(g["mean_abs_gap"])])  # fmt: skip
                worst += [
                    [model["name"], task["name"], group, f"{w['gap']:+.4f}",
                     clip(w["text_a"], 160), clip(w["text_b"], 160)]
                    for w in g.get("worst", [])[:2]
                ]  # fmt: skip
    scoring = report["results"][report["models"][0]["name"]][tasks[0]["name"]].get("scoring", "")
    blocks = [
        Block(
            text="Counterfactual bias: each example rewritten with one side's terms, then the "
            f"other's; the gap is score(side 0) - score(side 1), scored by {scoring} "
            "(0 = the model treats both sides alike).",
            table=gaps,
        )
    ]
    for png in sorted(plots.glob("bias_*.png")):
        blocks.append(Block(image=png, caption=png.stem.replace("_", " ")))
    if len(worst) > 1:
        blocks.append(Block(text="The largest gaps (all pairs are in errors.jsonl):", table=worst))
    return blocks


def story(report: dict[str, Any]) -> str:
    """One sentence per model: its headline metric on every task."""
    parts = []
    for model in report["models"]:
        cells = []
        for task in report["tasks"]:
            metrics = report["results"][model["name"]][task["name"]]
            cell = (
                f"{task['name']} {task['main_metric']} {fmt_num(metrics.get(task['main_metric']))}"
            )
            if "unigram_bits_per_byte" in metrics:
                cell += f" (unigram baseline {fmt_num(metrics['unigram_bits_per_byte'])})"
            cells.append(cell + _scoring_note(metrics))
        parts.append(f"{model['name']}: {', '.join(cells)}")
    return "; ".join(parts) + "."


@register_section("eval")
def eval_section(stage: StageInfo) -> list[Block]:
    path = stage.path / "eval.json"
    if not path.exists():
        return [Block(text="No eval.json in this eval directory.")]
    report = json.loads(path.read_text(encoding="utf-8"))
    models = ", ".join(f"{m['name']} ({fmt_num(m['params'])} params)" for m in report["models"])
    blocks = [
        Block(
            text=f"{len(report['models'])} model(s) on {len(report['tasks'])} task(s): {models}."
        ),
        Block(text=story(report), summary=True),
        Block(table=headline_table(report)),
    ]
    plots = stage.path / "plots"
    if (plots / "comparison.png").exists():
        blocks.append(Block(image=plots / "comparison.png", caption="headline metric per task"))
    for task in report["tasks"]:
        blocks += task_blocks(report, task)
    for png in sorted(plots.glob("confusion_*.png")):
        blocks.append(Block(image=png, caption=png.stem.replace("_", " ")))
    blocks += bias_blocks(report, plots)
    return blocks + _samples_block(stage.path) + _errors_block(stage.path)
