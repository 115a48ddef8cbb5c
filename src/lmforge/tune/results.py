"""What a search leaves on disk: the trials table, the best config, and two plots.

Written from the study itself (not from this worker's memory), so whichever worker finishes last
writes a table that holds every worker's trials:

- trials.csv / trials.json: number, state, objective value, params, duration, directory;
- best.yaml: the best trial's complete stage config, ready for `lmforge <stage> --config`;
- optimization_history.png: each trial's value and the best so far;
- param_importance.png: how much each key explains the objective (Optuna's fANOVA evaluator).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lmforge.common.plots import pyplot
from lmforge.tune.study import import_optuna

if TYPE_CHECKING:
    import optuna

    from lmforge.artifacts import StageContext
    from lmforge.tune.stage import TuneConfig

log = logging.getLogger(__name__)


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One flat row per trial, in trial order."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        duration = t.duration.total_seconds() if t.duration is not None else None
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                **{f"params.{k}": v for k, v in t.params.items()},
                "last_step": t.last_step,
                "duration_s": round(duration, 3) if duration is not None else None,
                "dir": t.user_attrs.get("dir", ""),
            }
        )
    return rows


def importances(study: optuna.Study, seed: int = 0) -> dict[str, float]:
    """Param -> importance (sums to 1), or {} when fewer than two trials have a value."""
    optuna = import_optuna()
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(finished) < 2:
        return {}
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))


def plot_history(rows: list[dict[str, Any]], direction: str, objective: str, path: Path) -> None:
    """Each finished trial's value (pruned ones hollow) and the best-so-far line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    best, line = None, []
    pick = min if direction == "minimize" else max
    for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
        pts = [
            (r["number"], r["value"])
            for r in rows
            if r["state"] == state and r["value"] is not None
        ]
        if pts:
            ax.scatter(*zip(*pts, strict=True), marker=marker, label=state.lower(), zorder=3)
    for r in rows:
        if r["state"] == "COMPLETE" and r["value"] is not None:
            best = r["value"] if best is None else pick(best, r["value"])
            line.append((r["number"], best))
    if line:
        ax.step(*zip(*line, strict=True), where="post", color="#c44e52", label="best so far")
    ax.set(xlabel="trial", ylabel=objective, title="optimization history")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_importance(scores: dict[str, float], path: Path) -> None:
    """Horizontal bars, most important key on top."""
    plt = pyplot()
    names = list(scores)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.5))
    ax.barh(names, [scores[n] for n in names], color="#4c72b0")
    ax.set(xlabel="importance (fANOVA, sums to 1)", title="parameter importance")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _csv_text(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_results(study: optuna.Study, cfg: TuneConfig, ctx: StageContext) -> dict[str, Any]:
    """Writes the table, best.yaml and plots into ctx.out; returns the headline metrics."""
    rows = trial_rows(study)
    states = [r["state"] for r in rows]
    metrics: dict[str, Any] = {
        "trials": len(rows),
        **{s.lower(): states.count(s) for s in ("COMPLETE", "PRUNED", "FAIL")},
    }
    scores = importances(study, cfg.seed)
    summary: dict[str, Any] = {
        "study": study.study_name,
        "objective": cfg.objective,
        "direction": cfg.direction,
        "sampler": cfg.sampler,
        "pruner": cfg.pruner,
        "stage": cfg.stage,
        "importance": scores,
        "trials": rows,
        "best": None,
    }
    if "COMPLETE" in states:
        best = study.best_trial
        best_cfg = cfg.trial_config(best.number, best.params)
        summary["best"] = {"number": best.number, "value": best.value, "params": best.params}
        ctx.atomic_write_text(ctx.out / "best.yaml", yaml.safe_dump(
            best_cfg.model_dump(mode="json"), sort_keys=False))  # fmt: skip
        metrics |= {"best_trial": best.number, f"best_{cfg.objective}": best.value}
        metrics |= {f"best.{k}": v for k, v in best.params.items()}
    ctx.atomic_write_json(ctx.out / "trials.json", summary)
    ctx.atomic_write_text(ctx.out / "trials.csv", _csv_text(rows))
    with ctx.atomic_path(ctx.out / "optimization_history.png") as tmp:
        plot_history(rows, cfg.direction, cfg.objective, tmp)
    if scores:
        with ctx.atomic_path(ctx.out / "param_importance.png") as tmp:
            plot_importance(scores, tmp)
    else:
        (ctx.out / "param_importance.png").unlink(missing_ok=True)
    return metrics


def load_results(stage_dir: Path) -> dict[str, Any] | None:
    """trials.json of a tune stage directory, or None."""
    try:
        return json.loads((Path(stage_dir) / "trials.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
