"""The `eval` stage: several models, several tasks, one comparison.

`lmforge eval --model DIR [--model DIR ...] --tasks LIST --out DIR` runs every task on every model
and writes, in the stage directory:

- eval.json: every metric of every model on every task, the task list with each task's headline
  metric, and the generation settings;
- errors.jsonl: the worst examples of each task for each model (see errors.py);
- generations.jsonl: every generation with its reference and scores (the report samples it);
- plots/comparison.png (headline metric per task, one bar per model),
  plots/confusion_<model>_<task>.png for classification tasks and plots/bias_<model>_<task>.png
  (the gap per group) for counterfactual tasks.

Models are loaded one at a time, so comparing many does not multiply memory.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import Field

from lmforge.artifacts import StageContext, run_stage
from lmforge.common.io import write_jsonl
from lmforge.common.plots import pyplot
from lmforge.config import Section, StageConfig, validate
from lmforge.errors import ConfigError
from lmforge.evals.bias import plot_gaps
from lmforge.evals.code_eval import code_sampling
from lmforge.evals.errors import worst_examples
from lmforge.evals.lm import EvalModel, GenerationSettings
from lmforge.evals.metrics import plot_confusion
from lmforge.evals.task_format import TaskResult, TaskSpec
from lmforge.evals.tasks import TASK_TYPES, load_task, run_task
from lmforge.model.convert import model_display_name, resolve_model_dir
from lmforge.model.generation_defaults import (
    defaults_left_unset,
    eval_leaves_out,
    read_generation_defaults,
    unapplied_keys,
)


class ModelRef(Section):
    """A model to evaluate, with the name it has in tables."""

    name: str = Field("", description="name in tables (default: the directory name)")
    path: Path = Field(description="model directory (HF layout) or a training stage directory")


class EvalConfig(StageConfig):
    """`lmforge eval --model DIR [--model DIR ...] --tasks LIST --out DIR`."""

    models: list[Path | ModelRef] = Field(
        description="model directories (or {name, path}); a stage directory means its final/"
    )
    tasks: list[str | dict[str, Any]] = Field(
        description="task YAML files, JSONL example files, data directories or inline task specs"
    )
    generation: GenerationSettings = Field(
        default_factory=GenerationSettings, description="settings for generation tasks"
    )
    errors_per_task: int = Field(5, ge=0, description="worst examples kept per model and task")
    device: str = Field("cpu", description="torch device the models run on")

    def model_refs(self) -> list[ModelRef]:
        """Every model with a unique table name."""
        refs, seen = [], set()
        for item in self.models:
            ref = item if isinstance(item, ModelRef) else ModelRef(path=item)
            model_dir = resolve_model_dir(ref.path)
            name = ref.name or model_display_name(model_dir)
            base, k = name, 2
            while name in seen:
                name, k = f"{base}-{k}", k + 1
            seen.add(name)
            refs.append(ModelRef(name=name, path=ref.path))
        return refs

    def task_specs(self) -> list[TaskSpec]:
        specs = [load_task(t) for t in self.tasks]
        names = [s.name for s in specs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"tasks: names {dupes} appear twice; give each task a unique 'name'")
        return specs

    def inputs(self) -> list[Path]:
        paths = [Path(m.path) for m in self.model_refs()]
        for item, spec in zip(self.tasks, self.task_specs(), strict=True):
            if isinstance(item, str):
                paths.append(Path(item))
            for extra in (spec.data, spec.terms):
                if extra is not None and Path(extra) not in paths:
                    paths.append(Path(extra))
        return paths

    def input_versions(self) -> dict[str, str]:
        """Per model, the checkpoint generation defaults its generation and code tasks leave unset
        (EvalModel.settings_for applies them), so that neither a result cached before lmforge
        read them nor one with those fields given (at their default value they hash as unset)
        is reused; and the checkpoint keys eval leaves out (do_sample and its sampling keys:
        eval decodes as its settings say; a decoder's max_length: eval_leaves_out), recorded in
        eval.json, so a result cached before that record (or before eval left max_length out)
        is not reused. None for our own models (they set none): their cached results stay
        valid."""
        from lmforge.model.convert import is_encoder_decoder

        given = [
            code_sampling(spec, self.generation).model_fields_set
            if spec.type == "code"
            else (spec.generation or self.generation).model_fields_set
            for spec in self.task_specs()
            if spec.type in ("generation", "code")
        ]
        versions = {}
        for ref in self.model_refs() if given else []:
            model_dir = resolve_model_dir(ref.path)
            defaults = read_generation_defaults(model_dir, is_encoder_decoder(model_dir))
            left_out = eval_leaves_out(defaults)
            unset = {
                k: v
                for fields in given
                for k, v in defaults_left_unset(model_dir, fields, left_out.keys()).items()
            }
            if unset:
                versions[f"generation_defaults:{model_dir.resolve()}"] = json.dumps(
                    unset, sort_keys=True
                )
            if ignored := unapplied_keys(model_dir, sampling_applied=False) | left_out:
                versions[f"generation_ignored:{model_dir.resolve()}"] = json.dumps(
                    ignored, sort_keys=True
                )
        return versions


def evaluate(cfg: EvalConfig | dict[str, Any], force: bool = False) -> Path:
    """Runs (or reuses) the eval stage; returns its directory (eval.json inside)."""
    if not isinstance(cfg, EvalConfig):
        cfg = validate(EvalConfig, cfg)
    return run_stage("eval", cfg, build, force=force).out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def build(cfg: EvalConfig, ctx: StageContext) -> dict[str, Any]:
    """Every task on every model; eval.json, errors.jsonl, generations.jsonl and plots."""
    specs, refs = cfg.task_specs(), cfg.model_refs()
    results: dict[str, dict[str, dict[str, Any]]] = {}
    models_info, errors, generations = [], [], []
    plots = ctx.out / "plots"
    for ref in refs:
        model = EvalModel.load(
            ref.path, name=ref.name, device=cfg.device, checkpoint_max_length=False
        )  # a decoder's max_length is the context: eval's max_new_tokens stands
        models_info.append({"name": ref.name, "path": str(model.path),
                            "params": model.num_params(), "family": model.scorer.kind,
                            "scoring": model.scorer.scoring})  # fmt: skip
        results[ref.name] = {}
        with ctx.progress(f"eval {ref.name}", total=len(specs), unit="task") as bar:
            for spec in specs:
                ctx.log.info("eval: %s on %s (%s)", ref.name, spec.name, spec.type)
                result = run_task(model, spec, cfg.generation)
                results[ref.name][spec.name] = result.metrics
                tags = {"model": ref.name, "task": spec.name}
                errors += worst_examples(spec.type, result.records, cfg.errors_per_task, **tags)
                if spec.type == "generation":
                    generations += [{**tags, **r} for r in result.records]
                _plot_confusion(
                    result, plots / f"confusion_{_slug(ref.name)}_{_slug(spec.name)}.png", tags
                )
                if spec.type == "counterfactual":
                    plot_gaps(
                        result.metrics,
                        plots / f"bias_{_slug(ref.name)}_{_slug(spec.name)}.png",
                        f"{ref.name} on {spec.name}: counterfactual gap per group",
                    )
                ctx.metrics.log(**tags, **_numeric(result.metrics))
                bar.advance()
        del model
    tasks_info = [
        {
            "name": s.name,
            "type": s.type,
            "main_metric": TASK_TYPES[s.type].headline_metric(
                *(results[r.name][s.name] for r in refs)
            ),
            "higher_is_better": TASK_TYPES[s.type].higher_is_better,
        }
        for s in specs
    ]
    report = {
        "models": models_info,
        "tasks": tasks_info,
        "results": results,
        "generation": cfg.generation.model_dump(),
    }
    ctx.atomic_write_json(ctx.out / "eval.json", report)
    write_jsonl(ctx.out / "errors.jsonl", errors)
    write_jsonl(ctx.out / "generations.jsonl", generations)
    plot_comparison(report, plots / "comparison.png")
    return headline(report)


def _plot_confusion(result: TaskResult, path: Path, tags: dict[str, str]) -> None:
    if result.confusion is not None:
        cm, labels = result.confusion
        plot_confusion(cm, labels, path, title=f"{tags['model']} on {tags['task']}")


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """Each task's headline metric per model (plus the unigram baseline next to perplexity)."""
    several = len(report["models"]) > 1
    out: dict[str, Any] = {}
    for model, per_task in report["results"].items():
        prefix = f"{model}/" if several else ""
        for task in report["tasks"]:
            metrics = per_task[task["name"]]
            out[f"{prefix}{task['name']}/{task['main_metric']}"] = metrics[task["main_metric"]]
            if "unigram_bits_per_byte" in metrics:
                out[f"{prefix}{task['name']}/unigram_bits_per_byte"] = metrics[
                    "unigram_bits_per_byte"
                ]
    return out


def plot_comparison(report: dict[str, Any], path: Path) -> Path:
    """One panel per task: its headline metric, one bar per model."""
    plt = pyplot()
    tasks, models = report["tasks"], [m["name"] for m in report["models"]]
    ticks = [m["name"] + (f"\n[{m['scoring']}]" if m.get("scoring", "causal") != "causal" else "")
             for m in report["models"]]  # fmt: skip
    cols = min(len(tasks), 3)
    rows = (len(tasks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, task in zip(axes.flat, tasks, strict=False):
        values = [report["results"][m][task["name"]][task["main_metric"]] for m in models]
        bars = ax.bar(range(len(models)), values, color=colors[: len(models)] or None)
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_xticks(range(len(models)), ticks, rotation=20, ha="right", fontsize=8)
        arrow = "higher is better" if task["higher_is_better"] else "lower is better"
        ax.set_title(f"{task['name']}\n{task['main_metric']} ({arrow})", fontsize=9)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def load_eval(stage_dir: Path) -> dict[str, Any]:
    """eval.json of an eval stage directory (for the report and for users)."""
    return json.loads((Path(stage_dir) / "eval.json").read_text(encoding="utf-8"))
