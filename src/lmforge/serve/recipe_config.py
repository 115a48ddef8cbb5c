"""Stage kind "serve-config": a recipe's last step, the config that serves what it trained.

Writes kb/ (the knowledge base documents: one Markdown file per stdlib module with its documented
functions, from the data stage's stdlib reader, so answers can cite Python's own docs) and
serve.yaml (ServeSettings: the model under `name`, that knowledge base, the default safety
policy, a feedback store beside it). `lmforge serve --config serve.yaml` serves it.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from typing import Any

from pydantic import Field

from lmforge.artifacts import StageContext, require_artifact
from lmforge.config import StageConfig, load_yaml, to_yaml, validate
from lmforge.errors import ConfigError


class ServeConfigStage(StageConfig):
    """`stage: serve-config`: serve.yaml + kb/ for `lmforge serve --config`."""

    model: Path = Field(description="model directory to serve")
    name: str = Field("assistant", description="model name clients ask for")
    kb_functions: int = Field(1500, ge=1, description="stdlib functions in the knowledge base")
    safety: Path | None = Field(None, description="safety policy YAML (default: the built-in one)")
    seed: int = Field(0, description="which functions the knowledge base samples")

    def inputs(self) -> list[Path]:
        from lmforge.data.stdlib_docs import corpus_marker

        return [self.model, corpus_marker(), *([self.safety] if self.safety else [])]


def write_kb(out: Path, n_functions: int, seed: int) -> int:
    """kb/<module>.md files of documented stdlib functions; returns how many were written."""
    from lmforge.data.stdlib_docs import iter_functions

    functions = [f for f in iter_functions() if str(f.get("docstring", "")).strip()]
    if len(functions) > n_functions:
        functions = random.Random(seed).sample(functions, n_functions)
    by_module: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for fn in functions:
        by_module[fn["module"]].append(fn)
    out.mkdir(parents=True, exist_ok=True)
    for module, fns in sorted(by_module.items()):
        parts = [f"# {module}\n"]
        for fn in sorted(fns, key=lambda f: f["qualname"]):
            parts.append(f"## {fn['qualname']}{fn.get('signature', '')}\n\n{fn['docstring']}\n")
        (out / f"{module}.md").write_text("\n".join(parts), encoding="utf-8")
    return len(functions)


def build(cfg: ServeConfigStage, ctx: StageContext) -> dict[str, Any]:
    from lmforge.serve.safety import DEFAULT_POLICY, SafetyPolicy
    from lmforge.serve.settings import ServeSettings

    require_artifact(cfg.model, ["config.json"], hint="train the model stage first")
    safety = (cfg.safety or DEFAULT_POLICY).resolve()
    SafetyPolicy.from_file(safety)  # a bad policy fails here, not when the server starts
    with ctx.atomic_path(ctx.out / "kb") as kb:
        n = write_kb(kb, cfg.kb_functions, cfg.seed)
    settings = ServeSettings(
        models=[{"name": cfg.name, "path": cfg.model.resolve()}],
        kb=(ctx.out / "kb").resolve(),
        safety=safety,
        feedback_db=(ctx.out / "feedback.db").resolve(),
    )
    ctx.atomic_write_text(ctx.out / "serve.yaml", to_yaml(settings))
    return {"kb_functions": n, "kb_files": len(list((ctx.out / "kb").glob("*.md"))),
            "model": cfg.name}  # fmt: skip


def load_serve_config(path: Path | str) -> Any:
    """ServeSettings from a serve.yaml (this stage's, or one written by hand)."""
    from lmforge.serve.settings import ServeSettings

    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"serve config {path} does not exist; run the recipe's serve-config stage"
        )
    return validate(ServeSettings, load_yaml(path), where=str(path))
