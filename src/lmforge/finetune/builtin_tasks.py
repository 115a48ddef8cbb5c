"""Built-in fine-tuning tasks from the Python standard library's docstrings (no download).

- explain: "Explain the Python function `json.dumps(obj, *, ...)`." -> the docstring's summary.
- classify: a docstring -> the module family it comes from (os, text, collections, ...).

The explain task splits by module (a stable hash of the module name), so its evaluation
functions come from modules the model never saw in fine-tuning; the classify task splits by
function (a hash of the qualified name), since a family is known only through its modules. The `tasks` stage writes explain_{train,val,test}.jsonl
(Alpaca records), classify_{train,val,test}.jsonl (text+label), eval_set.jsonl (every val/test
text, for the data stage's decontamination) and stats.json.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from lmforge.artifacts import StageContext, run_stage
from lmforge.common.io import write_jsonl
from lmforge.config import STDLIB_DOCS_VERSIONS, StageConfig
from lmforge.errors import ConfigError

# Module family -> stdlib modules in it. Fixed, so labels are the same on every machine.
FAMILIES: dict[str, tuple[str, ...]] = {
    "files": (
        "os",
        "posix",
        "posixpath",
        "shutil",
        "pathlib",
        "glob",
        "tempfile",
        "fnmatch",
        "filecmp",
    ),
    "text": ("string", "re", "textwrap", "difflib", "unicodedata", "html", "shlex"),
    "collections": ("collections", "heapq", "bisect", "itertools", "functools", "operator"),
    "io": ("io", "codecs", "json", "csv", "pickle", "base64", "binascii", "gzip", "zipfile"),
    "math": ("math", "statistics", "random", "decimal", "fractions", "cmath"),
    "net": ("socket", "urllib.parse", "http.client", "email.utils", "ipaddress", "ftplib"),
    "runtime": ("sys", "inspect", "importlib", "types", "typing", "warnings", "gc", "dis"),
    "time": ("time", "datetime", "calendar", "zoneinfo", "sched"),
}
SPLITS = ("train", "val", "test")


class TasksConfig(StageConfig):
    """`stage: tasks` in a recipe: writes the built-in explain and classify task files."""

    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of modules held out for val")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="share of modules held out for test")
    max_summary_chars: int = Field(200, ge=20, description="explain: answer length cap (chars)")
    max_text_chars: int = Field(400, ge=20, description="classify: docstring length cap (chars)")
    seed: int = Field(0, description="salt of the module hash that assigns splits")

    def inputs(self) -> list[Path]:
        """The tasks come from this Python's stdlib: another Python version rebuilds them."""
        from lmforge.data.stdlib_docs import corpus_marker

        return [corpus_marker()]

    version_sources = (STDLIB_DOCS_VERSIONS,)


@dataclass(frozen=True)
class Function:
    """One documented stdlib function."""

    qualname: str  # e.g. json.dumps or collections.Counter.most_common
    signature: str  # e.g. (obj, *, skipkeys=False, ...)
    module: str
    docstring: str


def _field(record: Any, *names: str) -> str:
    for name in names:
        value = record.get(name) if isinstance(record, dict) else getattr(record, name, None)
        if value is not None:
            return str(value)
    return ""


@functools.cache
def stdlib_functions() -> tuple[Function, ...]:
    """Documented functions: the data stage's stdlib-docs reader when present, else our walk.

    Cached: the reader imports much of the standard library in a child process (seconds).
    """
    return tuple(_documented())


def _documented() -> Iterator[Function]:
    try:
        from lmforge.data.stdlib_docs import iter_functions
    except ImportError:
        iter_functions = _walk_family_modules
    for rec in iter_functions():
        fn = Function(
            qualname=_field(rec, "qualname", "qualified_name", "name"),
            signature=_field(rec, "signature"),
            module=_field(rec, "module"),
            docstring=_field(rec, "docstring", "doc"),
        )
        if fn.qualname and fn.docstring.strip():
            yield fn


def _walk_family_modules() -> Iterator[Function]:
    """Public functions and methods of the family modules (used until data.stdlib_docs exists)."""
    for modules in FAMILIES.values():
        for name in modules:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            for attr, obj in sorted(vars(module).items()):
                if attr.startswith("_") or getattr(obj, "__module__", name) not in (name, None):
                    continue
                members = [(attr, obj)]
                if inspect.isclass(obj):
                    members += [(f"{attr}.{a}", m) for a, m in sorted(vars(obj).items())
                                if not a.startswith("_") and callable(m)]  # fmt: skip
                for qual, member in members:
                    if callable(member) and inspect.getdoc(member):
                        yield Function(f"{name}.{qual}", _signature(member), name,
                                       inspect.getdoc(member) or "")  # fmt: skip


def _signature(obj: Any) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def summary(docstring: str, max_chars: int) -> str:
    """The docstring's first paragraph, whitespace-collapsed, cut at a sentence within max_chars."""
    para = re.split(r"\n\s*\n", docstring.strip(), maxsplit=1)[0]
    text = " ".join(para.split())
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    end = cut.rfind(". ")
    return cut[: end + 1] if end > 20 else cut.rsplit(" ", 1)[0]


def family_of(module: str) -> str | None:
    """The family whose module list holds `module` (or its parent package)."""
    for family, modules in FAMILIES.items():
        if any(module == m or module.startswith(m + ".") for m in modules):
            return family
    return None


def split_of(key: str, cfg: TasksConfig) -> str:
    """train/val/test by a stable hash of `key` (never Python's salted hash())."""
    digest = hashlib.sha256(f"{cfg.seed}:{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < cfg.val_fraction:
        return "val"
    return "test" if u < cfg.val_fraction + cfg.test_fraction else "train"


def make_tasks_records(cfg: TasksConfig) -> dict[str, list[dict[str, Any]]]:
    """{"explain_train": [...], ..., "classify_test": [...]} records, deduplicated by name."""
    out: dict[str, list[dict[str, Any]]] = {
        f"{t}_{s}": [] for t in ("explain", "classify") for s in SPLITS
    }
    seen: set[str] = set()
    for fn in stdlib_functions():
        if fn.qualname in seen:
            continue
        seen.add(fn.qualname)
        split = split_of(fn.module, cfg)  # explain: whole modules are unseen
        answer = summary(fn.docstring, cfg.max_summary_chars)
        if len(answer) >= 10:
            out[f"explain_{split}"].append({
                "instruction": f"Explain the Python function `{fn.qualname}{fn.signature}`.",
                "output": answer, "category": fn.module,
            })  # fmt: skip
        family = family_of(fn.module)
        if family is not None:
            text = " ".join(fn.docstring.split())[: cfg.max_text_chars]
            # classify: functions are unseen, their families are not (a family is its modules)
            out[f"classify_{split_of(fn.qualname, cfg)}"].append(
                {"text": text, "label": family, "module": fn.module}
            )
    return _drop_leaked(out)


def _drop_leaked(out: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """Held-out records whose answer (explain) or text (classify) also occurs in train go.

    Many stdlib docstrings are copied between modules (the encodings.* codecs, inherited
    methods), so a module-disjoint split alone would still test on memorized answers.
    """
    for task, key in (("explain", "output"), ("classify", "text")):
        seen = {r[key] for r in out[f"{task}_train"]}
        for split in ("val", "test"):
            out[f"{task}_{split}"] = [r for r in out[f"{task}_{split}"] if r[key] not in seen]
    return out


def build(cfg: TasksConfig, ctx: StageContext) -> dict[str, Any]:
    """Writes the task files, eval_set.jsonl and stats.json; returns counts."""
    records = make_tasks_records(cfg)
    empty = [name for name, rows in records.items() if not rows]
    if empty:
        raise ConfigError(
            f"built-in tasks: no records for {', '.join(empty)}; lower tasks.val_fraction / "
            "tasks.test_fraction or change tasks.seed"
        )
    for name, rows in records.items():
        write_jsonl(ctx.out / f"{name}.jsonl", rows)
    eval_texts = [
        {"text": f"{r['instruction']}\n{r['output']}", "task": "explain"}
        for s in ("val", "test") for r in records[f"explain_{s}"]
    ] + [{"text": r["text"], "task": "classify"} for s in ("val", "test") for r in records[f"classify_{s}"]]  # fmt: skip
    write_jsonl(ctx.out / "eval_set.jsonl", eval_texts)
    counts = {name: len(rows) for name, rows in records.items()}
    labels = Counter(r["label"] for r in records["classify_train"])
    ctx.atomic_write_json(ctx.out / "stats.json", {"counts": counts, "train_labels": labels})
    return {**counts, "classes": len(labels), "eval_set": len(eval_texts)}


def make_tasks(cfg: TasksConfig, force: bool = False) -> Any:
    """Runs (or reuses) the tasks stage; returns its directory."""
    return run_stage("tasks", cfg, build, force=force).out
