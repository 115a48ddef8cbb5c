"""Run directories, manifests and the stage cache: how stages hand work to each other.

`run_stage` is the one place that decides whether a stage's work is still valid, runs it, and
marks it complete. A stage directory is complete exactly when its manifest.json exists, and the
manifest is written last, atomically, after every output file is hashed. A killed stage therefore
leaves a directory without a manifest, which the next run redoes and every consumer refuses.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import xxhash

import lmforge
from lmforge.common import progress as progress_mod
from lmforge.common.io import atomic_path, atomic_write_json, atomic_write_text
from lmforge.common.logging import MetricsWriter, is_rank_zero
from lmforge.config import StageConfig, config_hash, to_yaml
from lmforge.errors import InputError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CONFIG_FILE = "config.yaml"
# Outputs that are intermediate or volatile and must not decide downstream caching. tune's
# trials/ holds stage runs with their own manifests and the live study database, which other
# workers may be writing while this one hashes.
UNHASHED_DIRS = {"checkpoints", "__pycache__", "trials"}
RUN_MARKER = "run.json"  # in checkpoints/: the run_hash its checkpoints belong to

C = TypeVar("C", bound=StageConfig)


@dataclass(frozen=True)
class Expectation:
    """A recipe's reference timings, seen from one stage: how long this stage and the stages
    after it took on the machine the recipe was measured on (Recipe.reference)."""

    machine: str
    stage_s: float
    rest_s: float


@dataclass
class StageContext:
    """What a stage's build() gets besides its config: where to write and how to report."""

    out: Path
    stage: str
    log: logging.Logger
    metrics: MetricsWriter
    expect: Expectation | None = None
    # The config hash and the input content hashes together: checkpoints written under another
    # run_hash (a changed config OR changed input data) are never resumed.
    run_hash: str = ""
    started: float = field(default_factory=time.perf_counter)
    # Called by the training loop after each evaluation as on_eval(step, metrics); it may raise
    # to stop the run (tune's pruning of poor trials).
    on_eval: Callable[[int, dict[str, float]], None] | None = None
    atomic_path = staticmethod(atomic_path)
    atomic_write_text = staticmethod(atomic_write_text)
    atomic_write_json = staticmethod(atomic_write_json)
    progress = staticmethod(progress_mod.progress)

    def announce_eta(self, left_s: float, speed: str) -> None:
        """Logs, once early in a long stage, how long it has left on this machine and, in a
        recipe with reference timings, how long the stages after it should take here."""
        self.log.info("%s: %s, about %s left", self.stage, speed, fmt_duration(left_s))
        if self.expect is None or self.expect.stage_s <= 0:
            return
        scale = (time.perf_counter() - self.started + left_s) / self.expect.stage_s
        rest = self.expect.rest_s * scale
        self.log.info(
            "%s: at this machine's speed (%.1fx the time on the reference %s), the stages "
            "after it take about %s; the run ends in about %s",
            self.stage, scale, self.expect.machine, fmt_duration(rest),
            fmt_duration(left_s + rest),
        )  # fmt: skip


def fmt_duration(seconds: float) -> str:
    """12 s, 3 min 05 s, 1 h 02 min: a duration for people."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


@dataclass
class StageResult:
    """The outcome of run_stage: where the artifact is and whether it was reused."""

    out: Path
    cached: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0


def versions() -> dict[str, str]:
    """Versions recorded in every manifest, so a result can be traced to its software."""
    info = {"lmforge": lmforge.__version__, "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:  # the data stage runs without torch
        pass
    return info


def runtime() -> dict[str, Any]:
    """The machine a stage ran on, recorded so a slow or odd result can be traced to it.

    When the stage uses torch (its module imported it), its thread pool is first sized to the
    CPUs this process may use (lmforge.common.threads): torch's own default counts every core
    the kernel shows, which oversubscribes a container or VM slice with a CPU quota.
    """
    info: dict[str, Any] = {"cpu": cpu_model(), "cpus": os.cpu_count()}
    if "torch" in sys.modules:
        from lmforge.common.threads import configure_torch_threads

        info.update(configure_torch_threads())
    return info


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _iter_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in UNHASHED_DIRS and not d.startswith(".")
        )
        for name in sorted(filenames):
            if name != MANIFEST and not name.startswith("."):
                yield Path(dirpath) / name


def file_hash(path: Path) -> str:
    """xxh3-128 of a file's bytes, streamed (GB/s, so hashing shards and weights is cheap)."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def hash_outputs(root: Path) -> dict[str, str]:
    """Relative path -> content hash of every output file of a stage directory."""
    return {f.relative_to(root).as_posix(): file_hash(f) for f in _iter_files(root)}


def content_hash(path: Path) -> str:
    """The identity of an input: a stage directory's recorded outputs, else its bytes.

    A missing input hashes to "missing" so the stage itself reports it with the right hint.
    """
    path = Path(path)
    manifest = read_manifest(path) if path.is_dir() else None
    if manifest is not None:
        payload = json.dumps(manifest.get("outputs", {}), sort_keys=True)
    elif path.is_dir():
        payload = json.dumps(hash_outputs(path), sort_keys=True)
    elif path.exists():
        payload = file_hash(path)
        # a live SQLite database's committed rows; an empty WAL (a reader leaves one) holds none
        wal = path.with_name(path.name + "-wal")
        if wal.exists() and wal.stat().st_size:
            payload += file_hash(wal)
    else:  # the stage's own require_artifact() says what to run to build it
        return "missing"
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def input_hashes(cfg: StageConfig) -> dict[str, str]:
    """What the cache compares of a stage's inputs: each input path's content_hash, and the
    versions of the code behind an input that has no file of its own (cfg.input_versions())."""
    hashes = {str(Path(p).resolve()): content_hash(p) for p in cfg.inputs()}
    return hashes | cfg.input_versions()


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    """The manifest of a complete stage directory, or None if absent or unreadable."""
    path = Path(stage_dir) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def is_incomplete_stage(path: Path) -> bool:
    """A directory a stage started (config.yaml written) but never finished (no manifest)."""
    path = Path(path)
    return (path / CONFIG_FILE).exists() and not (path / MANIFEST).exists()


def require_artifact(path: Path, files: list[str], hint: str) -> Path:
    """Checks an input artifact before a stage uses it; the error says how to build it.

    Args:
        path: the directory a previous stage (or the user) provided.
        files: files that must exist inside it.
        hint: the command that builds a correct one, e.g. "lmforge tokenizer train ...".
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist; build it with: {hint}")
    if is_incomplete_stage(path):
        raise InputError(
            f"{path} is incomplete (its stage was interrupted: no {MANIFEST}); rerun: {hint}"
        )
    missing = [f for f in files if not (path / f).exists()]
    if missing:
        raise InputError(f"{path} has no {', '.join(missing)}; build it with: {hint}")
    return path


def _is_valid_cache(manifest: dict[str, Any] | None, cfg_hash: str, inputs: dict[str, str]) -> bool:
    return (
        manifest is not None
        and manifest.get("status") == "complete"
        and manifest.get("config_hash") == cfg_hash
        and manifest.get("inputs") == inputs
    )


def is_valid_result(cfg: StageConfig) -> dict[str, Any] | None:
    """The manifest in cfg.out if it is complete and matches cfg and its inputs, else None."""
    inputs = input_hashes(cfg)
    manifest = read_manifest(Path(cfg.out))
    return manifest if _is_valid_cache(manifest, config_hash(cfg), inputs) else None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _run_hash(cfg_hash: str, inputs: dict[str, str]) -> str:
    blob = json.dumps({"config": cfg_hash, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def checkpoints_run_hash(checkpoints: Path) -> str | None:
    """The run_hash the checkpoints under `checkpoints` were written for, from its RUN_MARKER
    (train.checkpoint.forget_other_runs writes it); None when there is none to read."""
    try:
        return json.loads((checkpoints / RUN_MARKER).read_text(encoding="utf-8")).get("run_hash")
    except (OSError, json.JSONDecodeError):
        return None


def _start_afresh_unless_resuming(out: Path, force: bool, run_hash: str) -> None:
    """Keeps checkpoints only for resuming the same run (same config and inputs, no --force);
    without checkpoints to resume from, the old metrics.jsonl goes too, so a rerun's rows are not
    appended to the last run's."""
    checkpoints = out / "checkpoints"
    if force or checkpoints_run_hash(checkpoints) != run_hash:
        shutil.rmtree(checkpoints, ignore_errors=True)
    if not any(checkpoints.glob("step_*")):
        (out / "metrics.jsonl").unlink(missing_ok=True)


def run_stage(
    stage: str,
    cfg: C,
    build: Callable[[C, StageContext], dict[str, Any] | None],
    *,
    force: bool = False,
    kind: str | None = None,
    expect: Expectation | None = None,
) -> StageResult:
    """Runs build(cfg, ctx) into cfg.out unless a complete, matching result is already there.

    Args:
        stage: the stage's name (its directory name in a recipe run).
        cfg: the validated config; cfg.out is the stage directory.
        build: does the work and returns headline metrics.
        force: rerun even when the cache is valid.
        kind: the stage kind from stages.py (defaults to stage).
        expect: the recipe's reference timings for this stage and the rest (announce_eta).
    """
    out = Path(cfg.out)
    cfg_hash = config_hash(cfg)
    inputs = input_hashes(cfg)
    manifest = read_manifest(out)
    if not force and _is_valid_cache(manifest, cfg_hash, inputs):
        log.debug("%s: cached (config and inputs unchanged) -> %s", stage, out)
        return StageResult(out, cached=True, metrics=manifest.get("metrics", {}))

    out.mkdir(parents=True, exist_ok=True)
    run_hash = _run_hash(cfg_hash, inputs)
    if is_rank_zero():
        # Remove the old manifest first: from here on the directory is "incomplete".
        (out / MANIFEST).unlink(missing_ok=True)
        atomic_write_text(out / CONFIG_FILE, to_yaml(cfg))
        _start_afresh_unless_resuming(out, force, run_hash)
    started, t0 = _now(), time.perf_counter()
    machine = runtime()
    metrics_writer = MetricsWriter(out / "metrics.jsonl")
    ctx = StageContext(
        out=out,
        stage=stage,
        log=logging.getLogger(f"lmforge.{stage}"),
        metrics=metrics_writer,
        expect=expect,
        run_hash=run_hash,
    )
    log.info("%s: running -> %s", stage, out)
    try:
        metrics = build(cfg, ctx) or {}
    finally:
        metrics_writer.close()
    duration = time.perf_counter() - t0
    if is_rank_zero():
        atomic_write_json(
            out / MANIFEST,
            {
                "stage": stage,
                "kind": kind or stage,
                "status": "complete",
                "config": cfg.model_dump(mode="json"),
                "config_hash": cfg_hash,
                "inputs": inputs,
                "outputs": hash_outputs(out),
                "versions": versions(),
                "runtime": machine,
                "started_at": started,
                "finished_at": _now(),
                "duration_s": round(duration, 3),
                "metrics": metrics,
            },
        )
    return StageResult(out, cached=False, metrics=metrics, duration_s=duration)
