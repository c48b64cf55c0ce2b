"""Issue 11: nothing stalls a worker's event loop: an unread notify socket, a hung check, a
slow log target. Real processes under load; the stalls are real (a socket nobody reads, a
filesystem whose stat never returns)."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import MakeSupervised
from tests.helpers import HOST, children, load

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
