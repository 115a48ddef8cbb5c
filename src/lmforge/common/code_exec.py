"""Running model-written Python against its tests in a separate, limited process.

Each job (a program and its test snippets) runs in a fresh `python -I` subprocess: its own
session (the whole process group is killed at the wall-clock timeout; an alarm a little later
ends it on its own should the caller die first), resource limits set
before any model code runs (RLIMIT_AS memory, RLIMIT_CPU, no core files, RLIMIT_FSIZE), a fresh
temporary working directory removed afterwards, stdin closed, stdout discarded, stderr to a
file in that directory (RLIMIT_FSIZE bounds it; only its tail is read back), a scrubbed
environment, and os.system / fork / exec / kill, subprocess and multiprocessing's spawn
(_posixsubprocess) disabled: Python's own ways to start a process that could leave the group
and outlive the run (ctypes still could). The program runs first, then each test in the same
namespace; the result says passed, failed (an assertion, with the short reason),
timeout or error (any other exception, an early exit, a crash), and how many tests passed.
Nothing a bad program does raises in the caller.

This is process isolation, not a security boundary (as human-eval's own warning says): the
program can still read and write what the user can, and reach the network. Running model code
is therefore refused unless the user opts in (`allow_code_execution: true`, require_opt_in).
RLIMIT_NPROC is not set: it counts every process of the user, so on a shared account it either
blocks nothing or blocks the sandbox itself; forking is disabled in the interpreter instead.
Neither is the disk bounded beyond each file's RLIMIT_FSIZE. The program shares its
interpreter with the harness that runs its tests, so a program written to do so can forge its
own verdict: scores hold for programs that try to pass the tests, not ones that attack them.
The timeout is wall-clock: on an overloaded machine a slow correct program may time out, so
results (and pass@k) then depend on load. Linux only (require_linux).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmforge.common.threads import usable_cpus
from lmforge.errors import ConfigError

Status = Literal["passed", "failed", "timeout", "error"]
STATUSES: tuple[Status, ...] = ("passed", "failed", "timeout", "error")
REASON_CHARS = 300  # of a failure's reason kept in results
OUTPUT_LIMIT = 16 << 20  # bytes any file the program writes may reach (RLIMIT_FSIZE)

# Runs inside the child: limits, guards, then the program and each test; the outcome goes to
# the result file as JSON. argv: job file, result file.
_BOOT = r"""
import json, linecache, os, resource, sys, traceback
job_file, result_file = sys.argv[1], sys.argv[2]
del sys.argv[1:]
with open(job_file, encoding="utf-8") as f:
    job = json.load(f)
REASON_CHARS = job["reason_chars"]
os.remove(job_file)
for name, soft in (("RLIMIT_AS", job["memory"]), ("RLIMIT_CPU", job["cpu"]),
                   ("RLIMIT_CORE", 0), ("RLIMIT_FSIZE", job["fsize"])):
    resource.setrlimit(getattr(resource, name), (soft, soft))
import signal
signal.alarm(job["cpu"] + 1)  # its own deadline: a sleeping child ends even if the parent died
import subprocess, shutil
def _disabled(name):
    def refuse(*args, **kwargs):
        raise PermissionError(name + " is disabled in the code sandbox")
    return refuse
for name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "execv", "execve",
             "execvp", "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve",
             "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "putenv"):
    if hasattr(os, name):
        setattr(os, name, _disabled("os." + name))
import _posixsubprocess  # multiprocessing's spawn and forkserver start processes through it
_posixsubprocess.fork_exec = _disabled("_posixsubprocess.fork_exec")
subprocess.Popen = _disabled("subprocess.Popen")
shutil.rmtree = _disabled("shutil.rmtree")

def _describe(err, filenames):
    frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename in filenames]
    last = frames[-1] if frames else None
    where = f" at {last.filename} line {last.lineno}: {last.line}" if last else ""
    try:  # the program's own exception class may fail to print
        message = str(err)[:REASON_CHARS]
    except BaseException:
        message = "(its message could not be printed)"
    text = f"{type(err).__name__}{': ' + message if message else ''}{where}"
    return ("failed" if isinstance(err, AssertionError) else "error"), text

def _run(source, filename, scope):
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), scope)

names = ["<program>"] + [f"<test {i + 1}>" for i in range(len(job["tests"]))]
scope = {"__name__": "__main__"}
result = {"status": "passed", "reason": "", "tests_passed": 0}
try:
    _run(job["program"], names[0], scope)
except BaseException as err:
    result["status"], result["reason"] = _describe(err, names)
    if isinstance(err, SystemExit):
        result["status"] = "error"
        result["reason"] = f"the program exited (code {err.code}) before its tests ran"
else:
    for name, test in zip(names[1:], job["tests"]):
        try:
            _run(test, name, scope)
            result["tests_passed"] += 1
        except BaseException as err:
            if result["status"] == "passed":
                result["status"], result["reason"] = _describe(err, names)
                if isinstance(err, SystemExit):
                    result["status"] = "error"
                    result["reason"] = f"exited (code {err.code}) in {name}"
with open(result_file, "w", encoding="utf-8") as f:
    json.dump(result, f)
os._exit(0)
"""


@dataclass(frozen=True)
class SandboxLimits:
    """What one job may use: wall-clock seconds (CPU seconds are capped just above) and memory."""

    timeout_s: float = 10.0
    memory_mb: int = 1024


@dataclass(frozen=True)
class CodeJob:
    """A program and the test snippets run after it, in its namespace, one at a time."""

    program: str
    tests: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExecResult:
    """How a job ended: status, a short reason unless it passed, tests passed of its tests."""

    status: Status
    reason: str
    tests_passed: int
    tests_total: int
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def opt_in_message(what: str, setting: str) -> str:
    """Why running model-written code is refused, and the setting that allows it."""
    return (
        f"{what} runs model-written code on this machine (a separate process with limits, not "
        f"a security boundary); set {setting}: true to allow it"
    )


def require_opt_in(allowed: bool, what: str, setting: str) -> None:
    """A ConfigError naming `setting` unless the user opted in to running model-written code,
    or when this machine cannot run the sandbox (require_linux)."""
    if not allowed:
        raise ConfigError(opt_in_message(what, setting))
    require_linux(what)


def require_linux(what: str) -> None:
    """A ConfigError off Linux: elsewhere the child's limits fail or do not hold (macOS does not
    enforce RLIMIT_AS; Windows has no resource module or process groups), so every program
    would end as an error and pass@k read 0."""
    if not sys.platform.startswith("linux"):
        raise ConfigError(
            f"{what} runs model-written code in a sandbox that needs Linux (process sessions, "
            f"RLIMIT_AS); this machine is {sys.platform}: run it on Linux"
        )


def _environment(home: Path) -> dict[str, str]:
    """A scrubbed environment: no tokens, proxies or paths of the parent leak to the program."""
    return {"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8", "TMPDIR": str(home),
            "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}  # fmt: skip


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the session's every process, not just the child


def _printable(reason: str) -> str:
    """reason cut to REASON_CHARS, lone surrogates (a program's own message may hold them)
    escaped, so that the result can be written as UTF-8 JSON."""
    return reason[:REASON_CHARS].encode("utf-8", "backslashreplace").decode("utf-8")


def _read_result(path: Path, tests_total: int) -> tuple[Status, str, int]:
    """The child's (status, reason, tests passed); an error when the file is not one it
    writes (the program wrote over it, or died writing it)."""
    try:
        out = json.loads(path.read_bytes())
        status, reason, passed = out["status"], out["reason"], out["tests_passed"]
        if (
            status in STATUSES
            and isinstance(reason, str)
            and type(passed) is int
            and 0 <= passed <= tests_total
        ):
            return status, reason, passed
    except (ValueError, KeyError, TypeError):
        pass
    return "error", "its result file is not the sandbox's (the program wrote over it)", 0


def _ended_without_result(proc: subprocess.Popen, stderr: Path) -> tuple[Status, str]:
    """Why a child wrote no result: a signal (SIGXCPU, SIGALRM: a time limit) or an early exit."""
    code = proc.returncode
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:  # a real-time signal has no name
            name = f"signal {-code}"
        if -code in (signal.SIGXCPU, signal.SIGALRM):
            return "timeout", f"killed by {name} (its CPU time or own deadline)"
        return "error", f"killed by {name}"
    said = f"exited with code {code} before its tests finished"
    with open(stderr, "rb") as f:  # its last bytes only: stderr may hold OUTPUT_LIMIT of them
        f.seek(max(0, f.seek(0, os.SEEK_END) - 4 * REASON_CHARS))
        tail = f.read().decode("utf-8", errors="replace").strip()
    # the tail's end (a traceback's last line) is kept whole within REASON_CHARS
    return "error", f"{said}: {tail[-(REASON_CHARS - len(said) - 2) :]}" if tail else said


def run_job(job: CodeJob, limits: SandboxLimits = SandboxLimits()) -> ExecResult:
    """Runs one job in a fresh limited subprocess; never raises on what the program does."""
    require_linux("the code sandbox")
    start = time.monotonic()
    # a program may leave files it cannot remove (chmod): cleaning up must not raise here
    with tempfile.TemporaryDirectory(prefix="lmforge-code-", ignore_cleanup_errors=True) as tmp:
        root = Path(tmp)
        work = root / "work"
        work.mkdir()
        job_file, result_file = root / "job.json", root / f"result-{uuid.uuid4().hex}.json"
        job_file.write_text(json.dumps({
            "program": job.program, "tests": list(job.tests), "memory": limits.memory_mb << 20,
            "cpu": math.ceil(limits.timeout_s) + 1, "fsize": OUTPUT_LIMIT,
            "reason_chars": REASON_CHARS,
        }), encoding="utf-8")  # fmt: skip
        stderr = root / "stderr.txt"
        with open(stderr, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _BOOT, str(job_file), str(result_file)],
                cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                env=_environment(work), start_new_session=True,
            )  # fmt: skip
            try:
                proc.wait(timeout=limits.timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc)
                proc.wait()
        seconds = time.monotonic() - start
        if timed_out:
            status, reason, passed = "timeout", f"ran past {limits.timeout_s:g} s", 0
        elif result_file.exists():
            status, reason, passed = _read_result(result_file, len(job.tests))
        else:
            (status, reason), passed = _ended_without_result(proc, stderr), 0
    return ExecResult(status, _printable(reason), passed, len(job.tests), seconds)


def run_jobs(
    jobs: list[CodeJob], limits: SandboxLimits = SandboxLimits(), workers: int | None = None
) -> list[ExecResult]:
    """Every job's result, in order, `workers` subprocesses at a time (default: usable CPUs)."""
    if not jobs:
        return []
    with ThreadPoolExecutor(max_workers=min(workers or usable_cpus(), len(jobs))) as pool:
        return list(pool.map(lambda job: run_job(job, limits), jobs))
