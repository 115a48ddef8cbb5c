"""Starts `lmforge serve` in a child process on a free local port and waits until it is ready.

`lmforge serve bench --start-model`, benchmarks/bench_serve.py and the browser test each need a
real server of their own for one run; this is the one place that starts it (through the CLI, so
what runs is exactly what a person runs), waits for GET /ready, and stops it with SIGTERM so the
server drains as in production.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from lmforge.errors import StageError


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`lmforge serve --model M ... --host 127.0.0.1 --port P [args]` for the length of a with-block.

    `models` are `--model` values (DIR or NAME=DIR); `args` any other serve flags. The server's
    output goes to `log_path` (a temporary file by default), whose tail is in the error raised
    when the server exits or is not ready within `ready_timeout` seconds.
    """

    def __init__(
        self,
        models: Sequence[str | Path],
        *,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        ready_timeout: float = 120.0,
        log_path: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        model_flags = [flag for m in models for flag in ("--model", str(m))]
        self.command = [
            sys.executable, "-m", "lmforge.cli", "serve", *model_flags,
            "--host", "127.0.0.1", "--port", str(self.port), *args,
        ]  # fmt: skip
        self.env = {**os.environ, **(env or {})}
        self.ready_timeout = ready_timeout
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="lmforge-serve-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path else ""

    def _wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise StageError(
                    f"lmforge serve exited with code {self.process.returncode} before it was "
                    f"ready; its log ({self.log_path}) ends:\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/ready", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass  # not listening yet
            time.sleep(0.2)
        raise StageError(
            f"lmforge serve was not ready at {self.url}/ready within {self.ready_timeout:.0f} s; "
            f"its log ({self.log_path}) ends:\n{self.log_tail()}"
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Sends `sig` (SIGTERM: the server drains in-flight requests), SIGKILL after `timeout`
        seconds; the exit status (None when it never started)."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
