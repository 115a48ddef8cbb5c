"""A real `lmforge serve` in a subprocess on a free port, for the server's end-to-end tests."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx
from unit.finetune.helpers import make_model_dir, make_tokenizer_dir

from lmforge.serve import launch

ROOT = Path(__file__).resolve().parents[2]
LONG_CONTEXT = 1024  # room for answers long enough to be cut short by a disconnect or a timeout


def make_serve_model(tmp: Path) -> Path:
    """A micro model with a long context window and wide initial weights: a default-initialized
    model only repeats the prompt's last token, which would let a server that mixes up sequences
    or positions pass; this one writes a varied (gibberish) text for every prompt."""
    return make_model_dir(
        tmp / "runs" / "q" / "sft" / "final",
        make_tokenizer_dir(tmp / "tok"),
        block_size=LONG_CONTEXT,
        init_std=0.2,
    )


def direct_greedy(model_dir: Path):
    """prompt, n -> the model's greedy continuation decoded directly, no server in between."""
    import torch

    from lmforge.model.convert import load_pretrained
    from lmforge.model.generate import generate
    from lmforge.tokenizer.files import TokenizerFiles

    model = load_pretrained(model_dir)
    files = TokenizerFiles.load(model_dir)

    def run(prompt: str, n: int) -> str:
        ids = files.encode(prompt)
        out = generate(model, torch.tensor([ids]), n, greedy=True)
        return files.decode(out[0, len(ids) :].tolist())

    return run


class ServerProcess(launch.ServerProcess):
    """launch.ServerProcess started at once, with what the tests read: the server's RSS, one
    /metrics sample, its output, and whether it stopped cleanly."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
        ), **(env or {})}  # fmt: skip
        super().__init__([], args=args, env=env, ready_timeout=60, log_path=log_path)
        self.__enter__()

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_kb(self) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))

    def metric(self, name: str, **labels: str) -> float:
        """One sample of /metrics (0 when the series does not exist yet)."""
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            series, _, value = line.rpartition(" ")
            metric, _, label_text = series.partition("{")
            got = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
            if metric == name and got == want:
                return float(value)
        return 0.0

    def wait_metric(self, name: str, want: float, timeout: float = 10.0, **labels: str) -> float:
        """Polls /metrics until the sample equals want (or timeout); returns the last value."""
        deadline = time.monotonic() + timeout
        while (value := self.metric(name, **labels)) != want and time.monotonic() < deadline:
            time.sleep(0.02)
        return value

    def stopped_cleanly(self) -> bool:
        """SIGTERM, then the lifespan shutdown (engines drained) ran to its end (uvicorn re-raises
        SIGTERM after its graceful shutdown, so a clean stop is -SIGTERM)."""
        code = self.stop(signal.SIGTERM)
        return code in (0, -signal.SIGTERM) and "Application shutdown complete" in self.output()
