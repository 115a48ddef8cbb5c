"""`lmforge report RUN_DIR`: one self-contained page telling the story of a run.

The report is derived after the fact from what stages left on disk (manifests, metrics, plots);
no stage writes into it. Each stage kind may register a section builder in `SECTIONS` that turns
its directory into blocks (text, tables, images); every stage also gets the generic part: its
time, headline metrics and the PNG plots it wrote. The HTML embeds images as data URIs, has no
script, and opens from disk without a server. report.md carries the same content for terminals
and diffs.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.artifacts import MANIFEST, read_manifest
from lmforge.common.io import atomic_write_text
from lmforge.errors import InputError


@dataclass
class Block:
    """One piece of a section: a paragraph, a table or an image (a PNG file)."""

    text: str = ""
    table: list[list[Any]] | None = None  # first row is the header
    image: Path | None = None
    caption: str = ""
    summary: bool = False  # this text also opens the report, in "The run at a glance"


@dataclass
class Section:
    """A stage's part of the report."""

    title: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class StageInfo:
    """What the report knows about one stage directory."""

    name: str
    kind: str
    path: Path
    manifest: dict[str, Any]
    assets: Path | None = None  # where section builders write the plots they derive

    def asset(self, name: str) -> Path:
        """A path for a derived plot: <run>/report_files/<stage>_<name>."""
        root = self.assets or self.path / "report_files"
        root.mkdir(parents=True, exist_ok=True)
        return root / f"{self.name}_{name}"


# kind -> builder(stage) -> blocks placed before the generic metrics/plots of that stage.
SECTIONS: dict[str, Callable[[StageInfo], list[Block]]] = {}
# kind -> names of the stage's own PNGs its section already shows better (not repeated).
REPLACES: dict[str, tuple[str, ...]] = {}
# kinds whose section already shows every headline metric (no second table of the same numbers)
NO_HEADLINE_TABLE: set[str] = set()


def register_section(kind: str, replaces: tuple[str, ...] = (), headline: bool = True) -> Callable:
    """Decorator registering a section builder for a stage kind.

    Args:
        replaces: PNG file names in the stage directory that the section supersedes (e.g. a
            loss.png the section redraws with validation loss and throughput).
        headline: False when the section's tables already hold the manifest's headline metrics.
    """

    def wrap(fn: Callable[[StageInfo], list[Block]]) -> Callable[[StageInfo], list[Block]]:
        SECTIONS[kind] = fn
        REPLACES[kind] = replaces
        if not headline:
            NO_HEADLINE_TABLE.add(kind)
        return fn

    return wrap


def discover_stages(run_dir: Path) -> list[StageInfo]:
    """Complete stages of a run, in recipe order (run.json) or by start time."""
    order: list[str] = []
    run_json = run_dir / "run.json"
    if run_json.exists():
        order = [s["name"] for s in json.loads(run_json.read_text())["stages"]]
    found = {p.parent.name: p.parent for p in sorted(run_dir.glob(f"*/{MANIFEST}"))}
    if not found and (run_dir / MANIFEST).exists():  # a single stage directory
        found = {run_dir.name: run_dir}
    stages = []
    for name, path in found.items():
        manifest = read_manifest(path)
        if manifest is not None:
            stages.append(StageInfo(name, manifest.get("kind", name), path, manifest))
    rank = {name: i for i, name in enumerate(order)}
    stages.sort(key=lambda s: (rank.get(s.name, len(rank)), s.manifest.get("started_at", "")))
    return stages


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)[:120]
    return str(value)


def _generic_blocks(stage: StageInfo, shown: set[Path]) -> list[Block]:
    metrics = stage.manifest.get("metrics", {})
    blocks = []
    if metrics and stage.kind not in NO_HEADLINE_TABLE:
        rows = [["headline metric", "value"]] + [[k, _fmt(v)] for k, v in metrics.items()]
        blocks.append(Block(table=rows))
    skip = set(REPLACES.get(stage.kind, ()))
    for png in sorted(stage.path.glob("*.png")):
        if png.name not in skip and png.resolve() not in shown:
            blocks.append(Block(image=png, caption=png.stem.replace("_", " ")))
    return blocks


def build_sections(stages: list[StageInfo]) -> list[Section]:
    """The overview table, then one section per stage."""
    overview = [["stage", "kind", "time (s)", "finished"]]
    total = 0.0
    for s in stages:
        seconds = float(s.manifest.get("duration_s", 0.0))
        total += seconds
        overview.append([s.name, s.kind, f"{seconds:.1f}", s.manifest.get("finished_at", "")])
    overview.append(["total", "", f"{total:.1f}", ""])
    sections = [Section("Stages and time", [Block(table=overview)])]
    story = []
    for s in stages:
        extra = SECTIONS.get(s.kind, lambda _: [])(s)
        story += [Block(text=f"{s.name}: {b.text}") for b in extra if b.summary and b.text]
        shown = {b.image.resolve() for b in extra if b.image is not None}
        sections.append(Section(f"{s.name} ({s.kind})", extra + _generic_blocks(s, shown)))
    if story:
        sections.insert(0, Section("The run at a glance", story))
    return sections


def _table_html(rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(_fmt(c))}</th>" for c in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>"
        for row in rows[1:]
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _block_html(block: Block) -> str:
    parts = []
    if block.text:
        parts.append(f"<p>{html.escape(block.text)}</p>")
    if block.table:
        parts.append(_table_html(block.table))
    if block.image is not None and block.image.exists():
        data = base64.b64encode(block.image.read_bytes()).decode()
        alt = html.escape(block.caption or block.image.stem)
        parts.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
            f"<figcaption>{alt}</figcaption></figure>"
        )
    return "\n".join(parts)


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #333}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f2f2f2}img{max-width:100%}figure{margin:1em 0}figcaption{color:#666;font-size:.9em}
td{white-space:pre-wrap;overflow-wrap:break-word;max-width:40em}p.note{color:#555}
"""


def render_html(title: str, description: str, sections: list[Section]) -> str:
    """A self-contained HTML page: inline CSS, embedded images, no scripts."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    if description:
        body.append(f"<p>{html.escape(description)}</p>")
    for section in sections:
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        body.extend(_block_html(b) for b in section.blocks)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )


def render_markdown(title: str, description: str, sections: list[Section], run_dir: Path) -> str:
    """The same report as Markdown, images linked relative to the run directory."""
    lines = [f"# {title}", ""]
    if description:
        lines += [description, ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            if block.text:
                lines += [block.text, ""]
            if block.table:
                header, *rows = block.table
                lines.append("| " + " | ".join(_fmt(c) for c in header) + " |")
                lines.append("|" + "---|" * len(header))
                lines += [
                    "| " + " | ".join(_fmt(c).replace("|", "\\|") for c in r) + " |" for r in rows
                ]
                lines.append("")
            if block.image is not None:
                rel = (
                    block.image.relative_to(run_dir)
                    if block.image.is_relative_to(run_dir)
                    else block.image
                )
                lines += [f"![{block.caption}]({rel.as_posix()})", ""]
    return "\n".join(lines)


def write_report(run_dir: Path) -> Path:
    """Writes report.html and report.md into run_dir; returns the HTML path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(
            f"{run_dir} is not a directory; pass a run directory such as runs/quickstart"
        )
    _load_section_builders()
    stages = discover_stages(run_dir)
    for stage in stages:
        stage.assets = run_dir / "report_files"
    if not stages:
        raise InputError(
            f"{run_dir} has no completed stage (no */{MANIFEST}); run a stage or recipe first"
        )
    run_info = (
        json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    )
    title = f"lmforge report: {run_info.get('name', run_dir.name)}"
    description = run_info.get("description", "")
    sections = build_sections(stages)
    html_path = run_dir / "report.html"
    atomic_write_text(html_path, render_html(title, description, sections))
    atomic_write_text(run_dir / "report.md", render_markdown(title, description, sections, run_dir))
    return html_path


def _load_section_builders() -> None:
    """Imports the modules that register stage-specific sections (they may be absent)."""
    import importlib

    for module in ("lmforge.evals.report_sections", "lmforge.evals.report_eval"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
