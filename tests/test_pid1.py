"""sdserve as PID 1 (issue 17, without systemd): orphans reaped, stop signals honoured.

Each test runs sdserve as the real PID 1 of a PID namespace of its own
(``unshare --pid --fork --mount-proc``, as root), binding its own socket and logging JSON
on stdout. The application (``tests/apps/orphans.py``) leaves orphans behind: children of
a helper that has exited, re-parented to PID 1, which exit at once. The test reads what
sdserve says from its JSON lines, and watches the namespace's processes from outside.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import HOST, children, get, load
from tests.pid1 import (
    JsonLog,
    free_port,
    host_children,
    inner_pid,
    make_orphans,
    ready,
    reaped,
    stop_seen,
    wait_exited,
    zombies,
)

ROOT = Path(__file__).resolve().parent.parent
APP = "tests.apps.orphans:create_app"
ORPHANS = 10


def _unshare_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root (a PID namespace of its own)"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if probe.returncode != 0:
        return f"unshare --pid --fork --mount-proc fails here: {probe.stderr.strip()}"
    return None


pytestmark = pytest.mark.skipif(
    (problem := _unshare_problem()) is not None, reason=str(problem or "")
)


@dataclass
class Pid1:
    """sdserve running as PID 1 of a PID namespace of its own."""

    proc: asyncio.subprocess.Process
    port: int
    log: JsonLog
    init: int = 0  # sdserve's host PID

    async def stop(self) -> int:
        os.kill(self.init, signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), 60)


@contextlib.asynccontextmanager
async def pid1(*args: str, workers: int = 0, namespace: bool = True) -> AsyncIterator[Pid1]:
    """sdserve as PID 1 of a new PID namespace (or, ``namespace=False``, as a plain child)."""
    port = free_port()
    argv = ["unshare", "--pid", "--fork", "--mount-proc"] if namespace else []
    argv += [sys.executable, "-m", "sdserve"]
    argv += ["run", APP, "--bind", f"{HOST}:{port}", "--log", "json"]
    argv += ["--workers", str(workers), *args]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,
    )
    assert proc.stdout is not None
    log = JsonLog(proc.stdout)
    reader = asyncio.create_task(log.read())
    try:
        if namespace:
            await log.expect("ready", ready, timeout=60)
            (init,) = host_children(proc.pid)  # unshare's one child
            assert inner_pid(init) == 1
        else:
            await log.expect("ready", lambda x: x.get("phase") == "ready", timeout=60)
            init = proc.pid
        yield Pid1(proc, port, log, init)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        await reader
    assert not log.bad, f"stdout lines that are not JSON objects: {log.bad[:3]}"


@pytest.mark.asyncio
@pytest.mark.parametrize("workers", [0, 1], ids=["single-process", "supervisor"])
async def test_pid1_reaps_orphans_keeps_its_workers_exit_statuses_and_reloads(
    workers: int,
) -> None:
    async with pid1("--drain-delay", "0", workers=workers) as server:
        orphans = await make_orphans(server.port, ORPHANS, status=7)
        lines = await server.log.expect("the orphans reaped", reaped, count=ORPHANS, timeout=30)
        assert {line["orphan"] for line in lines} == orphans
        assert {line["status"] for line in lines} == {7}
        assert {line["message"].rpartition(": ")[2] for line in lines} == {"exit status 7"}
        assert {line["pid"] for line in lines} == {1}
        assert zombies(server.init) == []
        if workers:
            # a worker's exit status stays the supervisor's to collect: killed, it is seen
            # killed (a stolen status would read as exit status 0), and it is replaced
            (worker,) = children(server.init)  # not the warm template beside it
            os.kill(worker, signal.SIGKILL)
            (died,) = await server.log.expect(
                "the worker's death", lambda x: x.get("phase") == "worker-died"
            )
            assert "(signal SIGKILL)" in died["message"], died
            await server.log.expect(
                "a new worker", lambda x: x.get("phase") == "worker-ready", count=2
            )
            assert len([line for line in server.log.lines if reaped(line)]) == ORPHANS
            # SIGHUP reaches PID 1 too: a reload (podman kill -s HUP)
            os.kill(server.init, signal.SIGHUP)
            await server.log.expect("the reload", lambda x: x.get("phase") == "reloaded")
        assert (await get(HOST, server.port, "/")).status == 200
        assert await server.stop() == 0


@pytest.mark.asyncio
async def test_reap_orphans_yes_reaps_as_a_child_subreaper_outside_a_container() -> None:
    async with pid1("--reap-orphans", "yes", "--drain-delay", "0", namespace=False) as server:
        orphans = await make_orphans(server.port, ORPHANS, status=5)
        lines = await server.log.expect("the orphans reaped", reaped, count=ORPHANS, timeout=30)
        assert {line["orphan"] for line in lines} == orphans
        assert {line["status"] for line in lines} == {5}
        assert {line["pid"] for line in lines} == {server.init}
        assert zombies(server.init) == []
        assert await server.stop() == 0


@pytest.mark.asyncio
async def test_without_the_reaper_the_orphans_stay_zombies() -> None:
    """The control: the same orphans under ``reap_orphans = "no"`` pile up as zombies."""
    async with pid1("--reap-orphans", "no", "--drain-delay", "0") as server:
        orphans = await make_orphans(server.port, ORPHANS, status=7)
        hosts = [pid for pid in host_children(server.init) if inner_pid(pid) in orphans]
        assert len(hosts) == ORPHANS
        await wait_exited(hosts, timeout=30)
        assert sorted(zombies(server.init)) == sorted(hosts)
        assert not [line for line in server.log.lines if line["logger"] == "sdserve.reaper"]
        assert await server.stop() == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("workers", [0, 2], ids=["single-process", "supervisor"])
async def test_pid1_drains_on_sigterm_under_load(workers: int) -> None:
    """The kernel drops the signals PID 1 has no handler for; sdserve's are in place, and
    SIGTERM drains. The load stops starting requests once sdserve says it stops (as a load
    balancer does when /readyz turns 503 during ``drain_delay``): every request sent is
    answered, none fails."""
    async with pid1("--drain-delay", "1", workers=workers) as server:
        async with load(HOST, server.port, keepalive=4, newconn=2) as stats:
            await stats.wait_ok(200, timeout=60)
            os.kill(server.init, signal.SIGTERM)
            await server.log.expect("the stop", stop_seen, timeout=30)
        assert await asyncio.wait_for(server.proc.wait(), 60) == 0
        assert stats.total_failed == 0, stats.failed
        assert stats.total_ok >= 200
        drained = [line for line in server.log.lines if line.get("phase") == "drained"]
        assert len(drained) == max(workers, 1), drained


def test_a_stop_signal_before_serving_ends_pid1_at_once() -> None:
    """Before the serving loop's handlers, SIGTERM ends PID 1 as it would any process
    (without a handler the kernel would drop it, and a stop would wait out its timeout)."""
    script = (
        "import os, sys\n"
        "from sdserve.reaper import stop_signals_before_serving\n"
        "stop_signals_before_serving()\n"
        "print(os.getpid(), flush=True)\n"
        "sys.stdin.read()\n"
    )
    with subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "1"
        (init,) = host_children(proc.pid)
        os.kill(init, signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        assert proc.stderr is not None
        assert "SIGTERM before serving" in proc.stderr.read()
