"""How many CPUs this process may really use, and torch's thread count to match.

torch sizes its intra-op pool by the cores the kernel reports, but a container or a VM slice
often may use fewer: a CPU affinity mask (taskset, cpusets) or a CFS quota (docker --cpus,
Kubernetes limits, systemd CPUQuota). With more busy threads than that, every parallel op ends
in a barrier whose threads the scheduler throttles in turn, and a small model trains several
times slower than on one thread. lmforge therefore sizes torch's pool by `usable_cpus()`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cpus(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> int:
    """CPUs this process can keep busy: its affinity mask, capped by its cgroup CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def cgroup_cpu_quota(
    cgroup_root: Path = CGROUP_ROOT, proc_cgroup: str | None = None
) -> float | None:
    """The tightest CFS quota (in CPUs) on this process's cgroup or its ancestors; None if none.

    Reads cgroup v2 `cpu.max` ("max 100000" or "150000 100000") and cgroup v1
    `cpu.cfs_quota_us` / `cpu.cfs_period_us` (-1 = no limit), walking from the process's own
    cgroup up to the root, since a parent's limit binds its children too.
    """
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text(encoding="utf-8")
        except OSError:
            return None
    limits: list[float] = []
    for line in proc_cgroup.splitlines():
        _, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if controllers == "":  # cgroup v2: "0::/path"
            dirs = _self_and_parents(cgroup_root, path)
            limits += [q for d in dirs if (q := _v2_quota(d / "cpu.max")) is not None]
        elif "cpu" in controllers.split(","):  # cgroup v1: "4:cpu,cpuacct:/path"
            for mount in (cgroup_root / "cpu", cgroup_root / controllers):
                dirs = _self_and_parents(mount, path)
                limits += [q for d in dirs if (q := _v1_quota(d)) is not None]
    return min(limits) if limits else None


def _self_and_parents(mount: Path, path: str) -> list[Path]:
    parts = [p for p in path.strip().split("/") if p]
    return [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _v2_quota(cpu_max: Path) -> float | None:
    try:
        quota, period = cpu_max.read_text(encoding="utf-8").split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1_quota(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text(encoding="utf-8"))
        period = int((directory / "cpu.cfs_period_us").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def configure_torch_threads() -> dict[str, int | str]:
    """Sets torch's intra-op threads and says where the number came from (for the manifest).

    A count the user chose through OMP_NUM_THREADS (torchrun sets 1 per process) is kept;
    otherwise torch gets usable_cpus() threads.
    """
    import torch

    usable = usable_cpus()
    if os.environ.get("OMP_NUM_THREADS"):
        threads, source = torch.get_num_threads(), "OMP_NUM_THREADS"
    else:
        threads, source = usable, "usable_cpus"
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return {"torch_threads": threads, "threads_from": source, "usable_cpus": usable}
