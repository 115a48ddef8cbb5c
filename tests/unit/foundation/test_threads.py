"""usable_cpus() reads affinity and cgroup CPU quotas; stages record and apply the result."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from lmforge.common.threads import cgroup_cpu_quota, configure_torch_threads, usable_cpus


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_of_own_group(tmp_path: Path) -> None:
    _write(tmp_path / "cpu.max", "max 100000\n")
    _write(tmp_path / "user.slice/job/cpu.max", "150000 100000\n")
    assert cgroup_cpu_quota(tmp_path, "0::/user.slice/job\n") == 1.5


def test_cgroup_v2_parent_limit_binds_child(tmp_path: Path) -> None:
    _write(tmp_path / "kubepods/cpu.max", "100000 100000\n")
    _write(tmp_path / "kubepods/pod/cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(tmp_path, "0::/kubepods/pod\n") == 1.0


def test_cgroup_v1_quota_and_unlimited(tmp_path: Path) -> None:
    proc = "4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n"
    _write(tmp_path / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "200000\n")
    _write(tmp_path / "cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(tmp_path, proc) == 2.0
    _write(tmp_path / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "-1\n")
    assert cgroup_cpu_quota(tmp_path, proc) is None


def test_no_cgroup_files_means_no_quota(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(tmp_path, "0::/\n") is None
    assert usable_cpus(tmp_path, "0::/\n") == len(os.sched_getaffinity(0))


def test_quota_caps_usable_cpus_rounding_up(tmp_path: Path) -> None:
    _write(tmp_path / "cpu.max", "50000 100000\n")  # half a CPU still gets one thread
    assert usable_cpus(tmp_path, "0::/\n") == 1
    _write(tmp_path / "cpu.max", "64000000 100000\n")  # a quota above the cores changes nothing
    assert usable_cpus(tmp_path, "0::/\n") == len(os.sched_getaffinity(0))


def test_configure_respects_omp_num_threads_then_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert configure_torch_threads()["threads_from"] == "OMP_NUM_THREADS"
        assert torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        info = configure_torch_threads()
        assert info == {
            "torch_threads": usable_cpus(),
            "threads_from": "usable_cpus",
            "usable_cpus": usable_cpus(),
        }
        assert torch.get_num_threads() == usable_cpus()
    finally:
        torch.set_num_threads(before)


V1_CPU = Path("/sys/fs/cgroup/cpu")


@pytest.mark.skipif(
    not (V1_CPU / "cpu.cfs_quota_us").exists() or not os.access(V1_CPU, os.W_OK),
    reason="needs a writable cgroup v1 cpu controller (root in this VM kind)",
)
def test_real_cgroup_quota_sets_torch_threads() -> None:
    """A process in a real 1-CPU cgroup gets one torch thread from lmforge, not one per core."""
    group = V1_CPU / f"lmforge-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "cpu.cfs_quota_us").write_text("100000")
        # the child moves itself into the group before lmforge reads /proc/self/cgroup
        script = (
            f"import os; open('{group}/cgroup.procs', 'w').write(str(os.getpid()));"
            "from lmforge.common.threads import configure_torch_threads;"
            "print(configure_torch_threads()['torch_threads'])"
        )
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == "1"
    finally:
        group.rmdir()


def test_manifest_records_the_runtime(tmp_path: Path) -> None:
    """Every stage that uses torch records its thread settings and the CPU in manifest.json."""
    from lmforge.artifacts import read_manifest, run_stage
    from lmforge.config import StageConfig

    run_stage("toy", StageConfig(out=tmp_path / "toy"), lambda cfg, ctx: {"ok": 1})
    runtime = read_manifest(tmp_path / "toy")["runtime"]
    assert runtime["torch_threads"] == torch.get_num_threads()
    assert runtime["threads_from"] in {"usable_cpus", "OMP_NUM_THREADS"}
    assert runtime["usable_cpus"] == usable_cpus() and runtime["cpus"] == os.cpu_count()
    assert runtime["cpu"]
