"""Issue 11: nothing stalls a worker's event loop: an unread notify socket, a hung check, a
slow log target. Real processes under load; the stalls are real (a socket nobody reads, a
filesystem whose stat never returns)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sdserve.checks import THREAD_NAME
from tests.conftest import MakeSupervised
from tests.helpers import HOST, children, get, load

pytestmark = pytest.mark.asyncio

#: how long the notify socket stays unread (the fault being tested, not a synchronisation)
UNREAD_FOR = 10.0


async def test_an_unread_notify_socket_does_not_stop_the_workers(
    supervised: MakeSupervised, port: int
) -> None:
    # WatchdogSec=1s: the supervisor pings systemd every 0.5 s, each worker the supervisor
    launcher = supervised(workers=2, env={"WATCHDOG_USEC": "1000000"})
    supervisor = await launcher.start()
    launcher.sink.pause()  # like a PID 1 too busy to read: its queue fills in seconds
    began = time.monotonic()
    async with load(HOST, port, keepalive=4, newconn=4) as stats:
        await stats.wait_ok(200, timeout=30)
        await asyncio.sleep(max(0.0, UNREAD_FOR - (time.monotonic() - began)))
        before = stats.total_ok
        await stats.wait_ok(before + 200, timeout=30)  # still serving after 10 s
    unread = time.monotonic() - began
    mark = len(launcher.sink.messages)
    launcher.sink.resume()
    # what waited is delivered once read again, and the pings go on
    await launcher.wait_for(supervisor, lambda m: m.has("WATCHDOG", "1"), timeout=10, start=mark)
    print(f"\nnotify socket unread for {unread:.1f}s: {stats.total_ok} requests served")
    assert not stats.failed, dict(stats.failed)
    assert stats.longest < 5.0  # no request waited out the stall
    assert len(children(supervisor.pid)) == 2  # no worker was aborted by the watchdog
    assert "watchdog" not in supervisor.log_text()
    assert await launcher.stop() == 0


# -- a hung check ---------------------------------------------------------------------------

FUSECTL = Path("/sys/fs/fuse/connections")


def _fuse_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "mounting FUSE needs root"
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"mfusepy and libfuse are needed: {exc}"
    return None


@dataclass
class HungMount:
    path: Path
    connection: Path

    def release(self) -> None:
        """End the hang: the stuck ``stat()`` calls fail with ENOTCONN. (A thread stuck in
        one cannot be killed, not even by SIGKILL, until the mount answers: as with a hard
        NFS mount.)"""
        with contextlib.suppress(OSError):
            (self.connection / "abort").write_text("1")


@pytest.fixture
def hung_mount(tmp_path: Path) -> Iterator[HungMount]:
    """A mount whose ``hang`` file never answers ``stat()``: a dead NFS server, for real."""
    if reason := _fuse_unavailable():
        pytest.skip(reason)
    if not any(FUSECTL.iterdir()) and not os.path.ismount(FUSECTL):
        subprocess.run(["mount", "-t", "fusectl", "none", str(FUSECTL)], check=True)
    mnt = tmp_path / "nfs"
    mnt.mkdir()
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "apps" / "hangfs.py"), str(mnt)],
        stdout=subprocess.PIPE,
        text=True,
    )
    mount: HungMount | None = None
    try:
        assert server.stdout is not None
        ready, _, _ = select.select([server.stdout], [], [], 30)
        assert ready
        assert server.stdout.readline().strip() == "mounted"
        mount = HungMount(mnt, FUSECTL / str(os.minor(os.stat(mnt).st_dev)))
        yield mount
    finally:
        if mount is not None:
            mount.release()
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        server.kill()
        server.wait()
        if server.stdout is not None:
            server.stdout.close()


def check_threads(pid: int) -> int:
    """Threads of ``pid`` named like sdserve's check threads."""
    names = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            names.append((task / "comm").read_text().strip())
    return names.count(THREAD_NAME)


async def test_a_hung_check_keeps_one_thread_and_the_resolver_answers(
    supervised: MakeSupervised, port: int, tmp_path: Path, hung_mount: HungMount
) -> None:
    conf = tmp_path / "checks.toml"
    conf.write_text(
        f'[checks.nfs]\ntype = "file"\npath = "{hung_mount.path / "hang"}"\n'
        'timeout = "0.2s"\ncritical = false\ninterval = "0.1s"\n'
    )
    launcher = supervised("--config", str(conf), workers=1)
    supervisor = await launcher.start()
    (worker,) = children(supervisor.pid)
    began = time.monotonic()
    counts = []
    for _ in range(100):  # 100 checks of the hung mount, one every 0.1 s
        counts.append(check_threads(worker))
        answer = await get(HOST, port, "/resolve?name=localhost", timeout=5)
        assert answer.status == 200  # the loop's own resolver still answers
        await asyncio.sleep(0.1)  # the pace of the observation, not a synchronisation
    watched = time.monotonic() - began
    print(f"\nhung check watched for {watched:.1f}s: check threads {sorted(set(counts))}")
    assert max(counts) == 1, counts  # one thread in all, never one per interval
    hung_mount.release()  # else the stuck thread holds the worker's exit (see release())
    assert await launcher.stop() == 0
