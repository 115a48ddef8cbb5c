"""The Ray executor on a real local Ray cluster: same output as the local executor."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from unit.data.corpus import prose

from lmforge.common.io import read_jsonl
from lmforge.data import prepare

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'lmforge[ray]')")
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster():
    ctx = ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


def outputs(out):
    return {s: list(read_jsonl(out / f"{s}.jsonl.zst")) for s in ("train", "val", "test")}


def test_ray_executor_matches_local(tmp_path, cluster):
    src = tmp_path / "src.jsonl"
    docs = [prose(i, 12) for i in range(30)]
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs + docs[:5]) + "{bad\n")
    base = {"source": [str(src)], "batch_size": 4}
    local = prepare({**base, "out": str(tmp_path / "local"), "workers": 1})
    on_ray = prepare({**base, "out": str(tmp_path / "ray"), "executor": "ray", "workers": 2})
    assert outputs(local) == outputs(on_ray)
    assert (local / "stats.json").read_text() == (on_ray / "stats.json").read_text()
    # and through the CLI, connecting to the running cluster by address
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmforge.cli",
            "--quiet",
            "data",
            "prepare",
            "--source",
            str(src),
            "--out",
            str(tmp_path / "cli"),
            "--executor",
            "ray",
            "--address",
            cluster,
            "--set",
            "batch_size=4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert outputs(tmp_path / "cli") == outputs(local)
