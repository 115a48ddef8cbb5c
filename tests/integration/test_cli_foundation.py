"""The CLI contract end to end in real processes: exit codes, one-line errors, SIGKILL safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lmforge.artifacts import read_manifest

TESTS = Path(__file__).resolve().parents[1]
# Runs the real CLI with the toy stages registered (they live in the tests tree).
LAUNCH = (
    f"import sys; sys.path.insert(0, {str(TESTS)!r}); import unit.foundation.toy_stages; "
    "from lmforge.cli import main; main()"
)


def lmforge(*args: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-c", LAUNCH, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        **kw,
    )


def write_recipe(tmp_path: Path, sleep: float = 0.0) -> Path:
    (tmp_path / "input.txt").write_text("Hello World")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "name: toy\nstages:\n  letters:\n    text: input.txt\n"
        f"  shout:\n    counts: '@letters'\n    repeat: 6\n    sleep: {sleep}\n"
    )
    return recipe


def test_help_lists_commands_with_examples(tmp_path: Path) -> None:
    out = lmforge("--help", cwd=tmp_path)
    assert out.returncode == 0
    for command in ("run", "report"):
        assert command in out.stdout
    run_help = lmforge("run", "--help", cwd=tmp_path)
    assert "Example: lmforge run" in run_help.stdout


def test_usage_errors_are_one_line_and_bare_lmforge_prints_help(tmp_path: Path) -> None:
    unknown = lmforge("nosuch", cwd=tmp_path)
    assert unknown.returncode == 2, unknown.stderr
    assert "No such command 'nosuch'" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    bad_flag = lmforge("run", "--no-such-flag", cwd=tmp_path)
    assert bad_flag.returncode == 2 and "No such option" in bad_flag.stderr
    assert "Traceback" not in bad_flag.stderr
    bare = lmforge(cwd=tmp_path)  # no arguments: the help, as click's no_args_is_help gives it
    assert "Traceback" not in bare.stdout + bare.stderr
    assert "Usage:" in bare.stdout + bare.stderr and "quickstart" in bare.stdout + bare.stderr
    assert bare.returncode in (0, 2)


def test_config_error_is_one_line_exit_2(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path)
    result = lmforge("run", str(recipe), "--set", "shout.repeat=abc", cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "bad value for 'repeat': 'abc'" in lines[0]
    assert "Traceback" not in result.stderr
    missing = lmforge("run", "nope.yaml", cwd=tmp_path)
    assert missing.returncode == 2 and "neither a file nor a built-in recipe" in missing.stderr
    quiet = lmforge("--quiet", "run", "nope.yaml", cwd=tmp_path)  # errors survive --quiet
    assert quiet.returncode == 2 and "neither a file nor a built-in recipe" in quiet.stderr


def test_run_twice_caches_and_reports_it(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path)
    first = lmforge("run", str(recipe), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "runs/toy/shout/manifest.json").exists()
    second = lmforge("run", str(recipe), cwd=tmp_path)
    assert second.returncode == 0
    assert second.stderr.count("cached") == 2


def test_sigkill_midway_leaves_incomplete_stage_that_reruns(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, sleep=0.5)
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, "run", str(recipe)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    shout = tmp_path / "runs/toy/shout"
    deadline = time.time() + 60
    while not (shout / "part_1.txt").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (shout / "part_1.txt").exists() and not (shout / "part_5.txt").exists()
    assert read_manifest(shout) is None  # killed: nothing claims to be complete
    assert read_manifest(tmp_path / "runs/toy/letters") is not None
    again = lmforge("run", str(recipe), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "letters: cached" in again.stderr
    assert read_manifest(shout)["status"] == "complete"
    assert sorted(p.name for p in shout.glob("part_*.txt")) == [f"part_{i}.txt" for i in range(6)]
    assert not list(shout.glob(".*tmp*"))  # no temp files left behind


def test_torchrun_non_zero_rank_waits_for_rank_zero_stages(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path)
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "COLUMNS": "200"}
    rank1 = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, "run", str(recipe)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2.0)
    assert rank1.poll() is None  # still waiting: single-process stages belong to rank zero
    assert not (tmp_path / "runs/toy/letters/manifest.json").exists()
    assert lmforge("run", str(recipe), cwd=tmp_path).returncode == 0  # rank zero does the work
    _, err = rank1.communicate(timeout=60)
    assert rank1.returncode == 0, err


def test_stage_command_takes_its_inputs_from_config_alone(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("tokens: missing_tokens\ntokenizer: missing_tok\nout: pre\n")
    result = lmforge("pretrain", "--config", "p.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "missing_tokens does not exist; build it with: lmforge tokenizer encode" in result.stderr
    bare = lmforge("pretrain", "--out", "pre", cwd=tmp_path)
    assert bare.returncode == 2 and "missing required key 'tokens'" in bare.stderr
