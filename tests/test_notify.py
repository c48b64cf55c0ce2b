"""Notify: the back ends (outside a loop) and the non-blocking sender (within one) send what a
real notify socket reads; a socket nobody reads never blocks the loop."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
from pathlib import Path

import pytest

from sdserve.launcher import NotifySink
from sdserve.notify import Notifier


@pytest.fixture
def sink_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="sdsn-"))


@pytest.mark.asyncio
@pytest.mark.parametrize("backend", ["systemd", "sdnotify"])
async def test_backend_sends_every_message(
    backend: str, sink_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = NotifySink(sink_dir / "n.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(sink.path))
    try:
        notifier = Notifier(backend=backend)  # type: ignore[arg-type]
        assert notifier.enabled
        assert (
            notifier.backend_name == {"systemd": "systemd-python", "sdnotify": "sdnotify"}[backend]
        )

        def send_all() -> list[bool]:  # outside a loop (this thread has none): the back end
            return [
                notifier.status("checking db"),
                notifier.extend_timeout(2.5),
                notifier.ready("serving"),
                notifier.reloading(),
                notifier.watchdog(),
                notifier.stopping(),
            ]

        assert await asyncio.to_thread(send_all) == [True] * 6
        got = [await sink.expect(lambda m: True, timeout=5, start=i) for i in range(6)]
    finally:
        sink.close()
    assert all(m.pid == os.getpid() for m in got)
    assert got[0].fields == {"STATUS": "checking db"}
    assert got[1].fields == {"EXTEND_TIMEOUT_USEC": "2500000"}
    assert got[2].fields == {"READY": "1", "STATUS": "serving"}
    assert got[3].fields["RELOADING"] == "1"
    assert int(got[3].fields["MONOTONIC_USEC"]) > 0
    assert got[4].fields == {"WATCHDOG": "1"}
    assert got[5].fields == {"STOPPING": "1"}


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    assert notifier.ready() is False


@pytest.mark.parametrize("backend", ["systemd", "sdnotify"])
def test_send_failure_is_logged(
    backend: str,
    sink_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    missing = sink_dir / "nobody-listens.sock"
    monkeypatch.setenv("NOTIFY_SOCKET", str(missing))
    notifier = Notifier(backend=backend)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="sdserve.notify"):
        assert notifier.ready() is False
    assert f"could not notify systemd at {missing} (READY=1)" in caplog.text


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    env = {"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(environ=env).watchdog_interval == 2.0
    assert (
        Notifier(environ={"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}).watchdog_interval
        is None
    )
    assert Notifier(environ={}).watchdog_interval is None


@pytest.mark.asyncio
async def test_sink_reports_sender_pid(sink_dir: Path) -> None:
    sink = NotifySink(sink_dir / "n.sock")
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "from sdserve.notify import Notifier; Notifier().status('from a child')",
            env={**os.environ, "NOTIFY_SOCKET": str(sink.path)},
        )
        assert await proc.wait() == 0
        message = await sink.expect(lambda m: "STATUS" in m.fields, timeout=5)
    finally:
        sink.close()
    assert message.fields["STATUS"] == "from a child"
    assert message.pid == proc.pid


@pytest.mark.asyncio
async def test_within_a_loop_an_unread_socket_never_blocks_and_order_is_kept(
    sink_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = NotifySink(sink_dir / "n.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(sink.path))
    notifier = Notifier()
    try:
        sink.pause()  # nobody reads: the socket's queue fills after a few datagrams
        assert notifier.ready("serving")
        for i in range(5000):  # a blocking send would hang here (the pytest timeout)
            assert notifier.watchdog()
            assert notifier.status(f"status {i}")
        assert notifier.stopping("bye")
        waiting = notifier.pending
        assert 0 < waiting <= 4  # the pings and statuses that wait were coalesced
        assert notifier.dropped > 9000
        sink.resume()
        await sink.expect(lambda m: m.has("STOPPING", "1"), timeout=10)
    finally:
        notifier.flush(timeout=1)
        sink.close()
    kinds = [next(iter(m.fields)) for m in sink.messages]
    # READY=1 and STOPPING=1 arrived, in order, and the last status is the newest one
    assert kinds.index("READY") < kinds.index("STOPPING")
    statuses = [m.fields["STATUS"] for m in sink.messages if set(m.fields) == {"STATUS"}]
    assert statuses[-1] == "status 4999"
    assert notifier.pending == 0


@pytest.mark.asyncio
async def test_flush_gives_up_on_a_socket_nobody_reads(
    sink_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sink = NotifySink(sink_dir / "n.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(sink.path))
    notifier = Notifier()
    try:
        sink.pause()
        for i in range(50):
            notifier.send(f"X_TEST={i}")  # none of these is coalesced
        assert notifier.pending > 0
        with caplog.at_level(logging.ERROR, logger="sdserve.notify"):
            notifier.flush(timeout=0.2)
    finally:
        sink.close()
    assert notifier.pending == 0
    assert "not read: lost X_TEST=" in caplog.text
