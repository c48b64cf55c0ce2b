"""The default worker count: the CPUs this process may use (issue 10, case 8).

Both limits are produced for real: an affinity mask set on a child process, and a cgroup
with a CPU quota that the child is moved into (cgroup v1 ``cpu`` or v2 ``cpu.max``, where
this machine lets root create one; skipped otherwise).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sdserve.cpus import CGROUP_MOUNT

PRINT_WORKERS = "from sdserve.config import Config; print(Config().workers)"


def workers_in_child(
    preexec: Callable[[], object] | None = None, cgroup: Path | None = None
) -> int:
    """``Config().workers`` as a child process sees it, optionally inside ``cgroup``."""
    code = PRINT_WORKERS
    if cgroup is not None:
        # move itself into the cgroup before sdserve is imported
        code = f"open({str(cgroup / 'cgroup.procs')!r}, 'w').write('0'); " + code
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        preexec_fn=preexec,
    )
    return int(out.stdout.strip())


def test_affinity_limits_the_default_worker_count() -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs at least 2 CPUs to restrict")
    first = min(os.sched_getaffinity(0))
    assert workers_in_child(lambda: os.sched_setaffinity(0, {first})) == 1
    assert workers_in_child() == len(os.sched_getaffinity(0))


@contextlib.contextmanager
def cpu_cgroup(cpus: float) -> Iterator[Path]:
    """A real cgroup with a CPU quota of ``cpus``, removed afterwards."""
    period = 100_000
    name = f"sdserve-test-{uuid.uuid4().hex[:8]}"
    v1 = CGROUP_MOUNT / "cpu"
    v2 = CGROUP_MOUNT
    if (v1 / "cpu.cfs_quota_us").exists() and os.access(v1, os.W_OK):
        folder = v1 / name
        folder.mkdir()
        (folder / "cpu.cfs_period_us").write_text(str(period))
        (folder / "cpu.cfs_quota_us").write_text(str(int(cpus * period)))
    elif "cpu" in (v2 / "cgroup.controllers").read_text().split() and os.access(v2, os.W_OK):
        folder = v2 / name
        folder.mkdir()
        (folder / "cpu.max").write_text(f"{int(cpus * period)} {period}")
    else:
        pytest.skip("no writable cgroup with a CPU controller on this machine")
    try:
        yield folder
    finally:
        folder.rmdir()


def test_a_cgroup_cpu_quota_limits_the_default_worker_count() -> None:
    if os.geteuid() != 0:
        pytest.skip("creating a cgroup needs root")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs at least 2 CPUs to see the quota")
    with cpu_cgroup(0.5) as folder:
        assert workers_in_child(cgroup=folder) == 1  # half a CPU: one worker, never zero
    with cpu_cgroup(1.5) as folder:
        assert workers_in_child(cgroup=folder) == 2  # rounded up


def test_the_tightest_quota_of_the_cgroup_and_its_parents_counts() -> None:
    """A child cgroup with no quota of its own inside a parent allowed 1 CPU: one worker."""
    if os.geteuid() != 0:
        pytest.skip("creating a cgroup needs root")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs at least 2 CPUs to see the quota")
    with cpu_cgroup(1.0) as parent:
        child = parent / "inner"
        child.mkdir()
        try:
            assert workers_in_child(cgroup=child) == 1
        finally:
            child.rmdir()
