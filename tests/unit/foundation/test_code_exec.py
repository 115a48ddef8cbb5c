"""The code sandbox: every way a program ends is a result, never an exception in the caller."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from lmforge.common.code_exec import CodeJob, SandboxLimits, require_opt_in, run_job, run_jobs
from lmforge.common.code_problems import code_problem, extract_code
from lmforge.errors import ConfigError, InputError

FAST = SandboxLimits(timeout_s=5.0, memory_mb=512)
ADD = "def add(a, b):\n    return a + b\n"


def test_passing_program_and_tests() -> None:
    r = run_job(CodeJob(ADD, ("assert add(1, 2) == 3", "assert add(-1, 1) == 0")), FAST)
    assert (r.status, r.reason, r.tests_passed, r.tests_total) == ("passed", "", 2, 2)


def test_failing_assert_reports_its_reason_and_counts_the_rest() -> None:
    tests = (
        "assert add(1, 2) == 3",
        "assert add(2, 2) == 5, 'two and two'",
        "assert add(0, 0) == 0",
    )
    r = run_job(CodeJob(ADD, tests), FAST)
    assert r.status == "failed" and r.tests_passed == 2 and r.tests_total == 3
    assert r.reason == "AssertionError: two and two at <test 2> line 1: " + tests[1]


def test_exception_is_an_error_with_its_type() -> None:
    r = run_job(CodeJob("def f(x):\n    return x / 0\n", ("assert f(1) == 1",)), FAST)
    assert r.status == "error" and r.reason.startswith("ZeroDivisionError: division by zero")
    assert run_job(CodeJob("def f(:\n", ()), FAST).reason.startswith("SyntaxError")


def test_infinite_loop_times_out_within_the_limit() -> None:
    start = time.monotonic()
    r = run_job(CodeJob("while True:\n    pass\n"), SandboxLimits(timeout_s=1.0))
    assert r.status == "timeout" and r.reason == "ran past 1 s"
    assert time.monotonic() - start < 3.0


def test_a_blocked_program_is_killed_at_the_timeout() -> None:
    # a sleeping test and a thread that never ends: wall-clock time, not CPU time, runs out
    program = "import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()\n"
    r = run_job(CodeJob(program, ("time.sleep(60)",)), SandboxLimits(timeout_s=1.0))
    assert r.status == "timeout" and r.seconds < 3.0


def test_memory_bomb_is_an_error_not_a_crash() -> None:
    r = run_job(CodeJob("x = bytearray(8 << 30)\n"), FAST)
    assert r.status == "error" and r.reason.startswith("MemoryError")


def test_os_system_and_subprocess_are_refused() -> None:
    r = run_job(CodeJob("import os\nos.system('touch /tmp/nope')\n"), FAST)
    assert r.status == "error" and "os.system is disabled" in r.reason
    r = run_job(CodeJob("import subprocess\nsubprocess.run(['true'])\n"), FAST)
    assert r.status == "error" and "subprocess.Popen is disabled" in r.reason


def test_no_process_outlives_its_run_in_a_session_of_its_own(tmp_path: Path) -> None:
    # multiprocessing's spawn starts a fresh interpreter (not the sandbox's) that could leave
    # the process group, so the kill at the end would miss it; starting it is refused
    marker = tmp_path / "escaped"
    body = f"import os, time\nos.setsid()\nopen({str(marker)!r}, 'w').write('x')\ntime.sleep(30)"
    program = (
        "import multiprocessing as mp, time\n"
        f"mp.get_context('spawn').Process(target=exec, args=({body!r},)).start()\ntime.sleep(2)\n"
    )
    r = run_job(CodeJob(program), FAST)
    assert r.status == "error" and "_posixsubprocess.fork_exec is disabled" in r.reason
    assert not marker.exists()


@pytest.mark.parametrize(
    ("program", "reason"),
    [
        ("import sys\nsys.exit(0)\n", "the program exited (code 0) before its tests ran"),
        ("import os\nos._exit(0)\n", "exited with code 0 before its tests finished"),
        ("import os\nos._exit(3)\n", "exited with code 3 before its tests finished"),
    ],
)
def test_an_early_exit_never_passes(program: str, reason: str) -> None:
    r = run_job(CodeJob(program, ("assert False",)), FAST)
    assert (r.status, r.reason) == ("error", reason)


def test_fresh_directory_scrubbed_environment_and_nothing_left(tmp_path: Path, monkeypatch) -> None:
    here, scratch = tmp_path / "cwd", tmp_path / "tmp"
    here.mkdir()
    scratch.mkdir()
    monkeypatch.chdir(here)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the sandbox's dir is made
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    program = (
        "import os, sys\nopen('out.txt', 'w').write('x')\n"
        "assert os.listdir('.') == ['out.txt'], os.listdir('.')\n"
        "assert 'SECRET_TOKEN' not in os.environ\n"
        "assert sys.stdin is None or sys.stdin.read() == ''\n"
    )
    assert run_job(CodeJob(program), FAST).status == "passed"
    assert os.listdir(here) == [] and os.listdir(scratch) == []


def test_jobs_run_in_order_several_at_a_time() -> None:
    jobs = [CodeJob(ADD, (f"assert add({i}, 1) == {i + 1 if i % 2 else 0}",)) for i in range(6)]
    results = run_jobs(jobs, FAST, workers=2)
    assert [r.status for r in results] == ["failed", "passed"] * 3


def test_opt_in_is_required_by_name() -> None:
    with pytest.raises(ConfigError, match=r"^task 'x' runs model-written code .* set a\.b: true"):
        require_opt_in(False, "task 'x'", "a.b")
    require_opt_in(True, "task 'x'", "a.b")


def test_refused_off_linux(monkeypatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(ConfigError, match=r"^task 'x' runs .* needs Linux .* machine is darwin"):
        require_opt_in(True, "task 'x'", "a.b")
    with pytest.raises(ConfigError, match=r"^the code sandbox .* needs Linux"):
        run_job(CodeJob(ADD), FAST)


def test_humaneval_and_mbpp_records_become_programs() -> None:
    he = code_problem(
        {"prompt": "def inc(x):\n", "test": "def check(f):\n    assert f(1) == 2\n",
         "entry_point": "inc"}, "r1",
    )  # fmt: skip
    assert run_job(he.job("    return x + 1\n"), FAST).status == "passed"
    assert run_job(he.job("    return x\n"), FAST).status == "failed"
    mbpp = code_problem(
        {"text": "Double a number.", "test_list": ["assert dbl(2) == K * 2", "assert dbl(0) == 0"],
         "test_setup_code": "K = 2"}, "r2",
    )  # fmt: skip
    assert mbpp.default_prompt() == '"""\nDouble a number.\nassert dbl(2) == K * 2\n"""\n'
    r = run_job(mbpp.job("def dbl(x):\n    return 2 * x\n"), FAST)
    assert (r.status, r.tests_passed) == ("passed", 2)
    with pytest.raises(InputError, match=r"data\.jsonl line 3: no tests"):
        code_problem({"prompt": "x"}, "data.jsonl line 3")


def test_extract_code_takes_the_first_fenced_block() -> None:
    assert extract_code("Here:\n```python\nx = 1\n```\nmore") == "x = 1\n"
    assert extract_code("x = 2") == "x = 2"


def test_unprintable_exceptions_and_long_messages_are_reasons() -> None:
    program = (
        "class Odd(Exception):\n    def __str__(self):\n        raise RuntimeError\nraise Odd()\n"
    )
    r = run_job(CodeJob(program), FAST)
    assert (r.status, r.reason) == ("error", "Odd: (its message could not be printed) at "
                                    "<program> line 4: raise Odd()")  # fmt: skip
    r = run_job(CodeJob("", ("assert False, 'x' * 10**6",)), FAST)
    assert r.status == "failed" and len(r.reason) == 300


@pytest.mark.parametrize(
    ("program", "reason"),
    [
        # a real-time signal has no name in signal.Signals
        ("import signal\nsignal.raise_signal(signal.SIGRTMIN + 2)\n", "killed by signal "),
        # the program overwrites the sandbox's result file (or the child dies writing it)
        ("import __main__, os\nopen(__main__.result_file, 'w').write('{\"stat')\nos._exit(0)\n",
         "its result file is not the sandbox's"),
        ("import __main__, os\nopen(__main__.result_file, 'w').write('{\"status\": \"won\", "
         "\"reason\": \"\", \"tests_passed\": 9}')\nos._exit(0)\n",
         "its result file is not the sandbox's"),
    ],
)  # fmt: skip
def test_odd_endings_are_errors_not_exceptions_in_the_caller(program: str, reason: str) -> None:
    r = run_job(CodeJob(program, ("assert True",)), FAST)
    assert r.status == "error" and r.reason.startswith(reason) and r.tests_passed == 0


def test_a_reason_with_lone_surrogates_can_be_written_as_utf8() -> None:
    r = run_job(CodeJob("raise ValueError('bad \\udc80 byte')\n"), FAST)
    assert r.status == "error" and "bad \\udc80 byte" in r.reason
    json.dumps(r.reason, ensure_ascii=False).encode("utf-8")  # what write_jsonl does


def test_output_is_bounded_and_only_stderrs_tail_is_read() -> None:
    # stdout is discarded: 256 MiB printed costs the caller nothing
    r = run_job(
        CodeJob("import sys\nfor _ in range(256):\n    sys.stdout.write('x' * (1 << 20))\n")
    )
    assert r.status == "passed"
    # stderr goes to a file capped by RLIMIT_FSIZE: the write past 16 MiB fails in the program
    r = run_job(CodeJob("import sys\nsys.stderr.write('x' * (64 << 20))\n"), FAST)
    assert r.status == "error" and r.reason.startswith("OSError: [Errno 27] File too large")
    # a crash after a long stderr: its reason is the tail
    program = "import os, sys\nsys.stderr.write('x' * (8 << 20) + 'THE END')\nsys.stderr.flush()\nos._exit(2)\n"
    r = run_job(CodeJob(program), FAST)
    assert r.status == "error" and r.reason.endswith("x" * 10 + "THE END")
    assert r.reason.startswith("exited with code 2 before its tests finished: ")


def test_a_sleeping_child_ends_on_its_own_when_the_caller_is_killed(tmp_path: Path) -> None:
    # the caller dies (SIGKILL: no cleanup runs) while its child sleeps in a session of its own
    pid_file = tmp_path / "pid"
    program = (
        f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)"
    )
    caller = (
        "from lmforge.common.code_exec import CodeJob, SandboxLimits, run_job\n"
        f"run_job(CodeJob({program!r}), SandboxLimits(timeout_s=0.5))\n"
    )
    src = str(Path(__file__).parents[3] / "src")
    env = {**os.environ, "PYTHONPATH": src, "TMPDIR": str(tmp_path)}  # its dir is left behind
    proc = subprocess.Popen([sys.executable, "-c", caller], env=env)
    deadline = time.monotonic() + 20
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the sandboxed program never started"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    child = int(pid_file.read_text())
    while _alive(child):  # its alarm: ceil(0.5) + 2 s after it started
        assert time.monotonic() < deadline, f"sandboxed process {child} outlived its caller"
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    """Whether pid runs (a zombie left for init to reap counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
