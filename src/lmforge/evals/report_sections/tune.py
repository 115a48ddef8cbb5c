"""Report section of the tune stage: the best trial, the trials table and the study's plots."""

from __future__ import annotations

from lmforge.evals.report import Block, StageInfo, register_section
from lmforge.evals.report_sections.common import fmt_num, read_json

TUNE_ROWS = 20  # trials shown in the report's table, best first


@register_section("tune", headline=False)
def tune_section(stage: StageInfo) -> list[Block]:
    """The best trial in a sentence, the best trials in a table, history and importance plots."""
    results = read_json(stage.path / "trials.json")
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
