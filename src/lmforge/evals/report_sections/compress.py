"""Report section of the compress stage: size, decode speed and perplexity (an encoder's:
pseudo-perplexity; a pruned classifier's accuracy) of the original and each variant, and a
quality-vs-size plot (compression.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.common.plots import pyplot
from lmforge.evals.report import Block, StageInfo, register_section
from lmforge.evals.report_sections.common import fmt_num, read_json

PSEUDO = "pseudo-perplexity"  # an encoder's (masked-token) perplexity, compress.measure.quality


def compression_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The variants compression.json measured: the original, the result, and the extras
    (dynamic int8 in memory; each exported file), each with what was measured for it."""
    method = report.get("method", "?")
    first = "teacher (fp32)" if method == "distill" else "original (fp32)"
    rows = [{"variant": first, **(report.get("before") or {})}]
    if method == "quantize":
        rows.append({"variant": _quantized_label(report), **(report.get("after") or {})})
        if report.get("dynamic_int8"):
            rows.append({"variant": "dynamic int8 (in memory)", **report["dynamic_int8"]})
    if method == "prune":
        p = report.get("pruning") or {}
        label = f"{p.get('kind', '?')} pruned {p.get('target', '?')}"
        if report.get("before_recovery") or "accuracy_pruned" in report:
            unrecovered = report.get("before_recovery") or {}
            rows.append({"variant": f"{label}, before recovery", **unrecovered})
            label += f", recovered {(report.get('recovery') or {}).get('steps', '?')} steps"
        rows.append({"variant": label, **(report.get("after") or {})})
        _add_accuracy(report, rows)
    if method == "distill":
        d = report.get("distillation") or {}
        label = f"student {d.get('student', '?')} ({fmt_num(d.get('student_params'))} params)"
        rows.append({"variant": label, **(report.get("after") or {})})
    if report.get("onnx"):
        rows.append({"variant": "ONNX (onnxruntime)", **report["onnx"]})
    if report.get("gguf"):  # compression.json before export.gguf_type: always f32
        rows.append({"variant": f"GGUF {report['gguf'].get('file_type', 'f32')}", **report["gguf"]})
    return rows


def _quantized_label(report: dict[str, Any]) -> str:
    """The result's row label: scheme, and a calibrated method with its calibration."""
    q = report.get("quantization") or {}
    label = f"{q.get('scheme', 'quantized')} weight-only"
    cal = q.get("calibration")
    if q.get("method", "rtn") == "rtn" or not cal:
        return label
    return f"{label}, {q['method'].upper()} on {cal['samples']} x {cal['seq_len']} tokens"


def _add_accuracy(report: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """A pruned classifier's accuracies (compress.prune_classifier) on its rows: the original,
    before recovery, recovered."""
    keys = ("accuracy_original", "accuracy_pruned", "accuracy_recovered")
    if all(k in report for k in keys):
        for row, key in zip(rows, keys, strict=True):
            row["accuracy"] = report[key]


def _accuracy_rows(report: dict[str, Any]) -> str:
    """Which rows a pruned classifier's accuracies were measured on, saying when they are the
    recovery's own training examples (no val_examples), so a reader does not take them for
    held-out accuracy; "" without accuracies."""
    cls = report.get("classification")
    if not isinstance(cls, dict) or "val_rows" not in cls:
        return ""
    note = f" Accuracy on {cls['val_rows']} rows of {Path(str(cls.get('val_examples'))).name}"
    if cls.get("val_examples") == cls.get("examples"):
        note += ", the examples the recovery trained on (no held-out val_examples given)"
    return note + "."


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
    report = read_json(stage.path / "compression.json")
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
        for key, name in (("perplexity", "perplexity"), ("pseudo_perplexity", PSEUDO)):
            if r.get(key) is not None and base.get(key):
                bits.append(f"{name} {100 * (r[key] / base[key] - 1):+.2f}%")
        if r.get("decode_max_abs_diff") is not None:
            diff = max(r["prefill_max_abs_diff"], r["decode_max_abs_diff"])
            bits.append(f"logits within {diff:.1e}")
        if r.get("max_abs_logit_diff") is not None:  # GGUF: the file's rounded weights
            bits.append(f"logits within {r['max_abs_logit_diff']:.1e}")
        if r.get("max_abs_diff") is not None:  # an encoder's ONNX graph: logits or states
            bits.append(f"outputs within {r['max_abs_diff']:.1e}")
        if r.get("accuracy") is not None and base.get("accuracy") is not None:
            bits.append(f"accuracy {r['accuracy']:.3f} (original {base['accuracy']:.3f})")
        parts.append(f"{r['variant']} " + ", ".join(bits))
    blocks = [Block(text=text + "; ".join(parts) + "." + _accuracy_rows(report), summary=True)]
    pseudo = any(r.get("pseudo_perplexity") is not None for r in rows)  # an encoder's
    accuracy = any(r.get("accuracy") is not None for r in rows)  # a pruned classifier's
    table = [["variant", "MB", "size", "tokens/s", "speed", "perplexity"]
             + [PSEUDO] * pseudo + ["bits/byte"] + ["accuracy"] * accuracy]  # fmt: skip
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
            *[fmt_num(r.get("pseudo_perplexity", ""))] * pseudo,
            fmt_num(r.get("bits_per_byte", "")),
            *[fmt_num(r.get("accuracy", ""))] * accuracy,
        ])  # fmt: skip
    blocks.append(Block(text="Trade-offs (greedy decode with a KV cache, this machine):",
                        table=table))  # fmt: skip
    plot = _plot_tradeoff(rows, stage.asset("tradeoff.png"))
    if plot:
        blocks.append(Block(image=plot, caption="quality vs size vs speed"))
    return blocks
