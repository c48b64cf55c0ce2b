"""How many CPUs this process may really use: the default number of workers.

``os.cpu_count()`` counts the host's CPUs. A service confined by ``taskset``,
``CPUAffinity=`` or a container's cpuset may run on fewer, and a cgroup CPU quota
(``CPUQuota=``, ``docker --cpus``, a Kubernetes CPU limit) caps how much of them
it gets. One worker per usable CPU is the default, so both limits count:

- the affinity mask (``sched_getaffinity``);
- the tightest CPU quota of this process's cgroup and its ancestors, rounded up:
  cgroup v2 ``cpu.max`` (``200000 100000`` is 2 CPUs, ``max`` is none), or
  cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1 is none).

Everything is read from files under ``root`` so that a test can point it at a
real cgroup it created (see ``tests/test_cpus.py``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_MOUNT = Path("/sys/fs/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _ancestors(base: Path, relative: str) -> list[Path]:
    """The cgroup folder of ``relative`` under ``base``, then each parent up to ``base``."""
    parts = [p for p in relative.split("/") if p]
    return [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _v2_limit(folder: Path) -> float | None:
    text = _read(folder / "cpu.max")
    if not text:
        return None
    quota, _, period = text.partition(" ")
    if quota == "max" or not period:
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def _v1_limit(folder: Path) -> float | None:
    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    try:
        q, p = int(quota or "-1"), int(period or "0")
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def quota_cpus(proc_cgroup: str, mount: Path = CGROUP_MOUNT) -> float | None:
    """The tightest CPU quota (in CPUs) over this cgroup and its ancestors, or None.

    ``proc_cgroup`` is the text of ``/proc/self/cgroup``.
    """
    limits: list[float] = []
    for line in proc_cgroup.splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, relative = rest.partition(":")
        if hier == "0" and controllers == "":
            for base in (mount, mount / "unified"):
                for folder in _ancestors(base, relative):
                    if (limit := _v2_limit(folder)) is not None:
                        limits.append(limit)
        elif "cpu" in controllers.split(","):
            for name in (controllers, "cpu", "cpu,cpuacct"):
                base = mount / name
                if base.is_dir():
                    for folder in _ancestors(base, relative):
                        if (limit := _v1_limit(folder)) is not None:
                            limits.append(limit)
                    break
    return min(limits) if limits else None


def available_cpus() -> int:
    """CPUs this process may use: its affinity, capped by its cgroup's CPU quota (at least 1)."""
    try:
        count = len(os.sched_getaffinity(0))
    except OSError:  # pragma: no cover - Linux always has it
        count = os.cpu_count() or 1
    text = _read(Path("/proc/self/cgroup"))
    quota = quota_cpus(text) if text else None
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)
