"""The drain against clients that do not behave, and the drain the application sees.

Each test is one of issue 11's cases: a stream ended from ``on_shutdown`` or from
``sdserve.draining``; one byte sent during the idle grace; a response still being written
when the drain starts (and a reader too slow for the deadline); pipelined requests.
Real processes, sockets and signals, through the launcher (systemd's part).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from sdserve.exitcodes import ExitCode
from sdserve.launcher import Instance, Launcher
from tests.conftest import LauncherFactory
from tests.helpers import Gate, ProtocolError, read_response, request_bytes

pytestmark = pytest.mark.asyncio
HOST = "127.0.0.1"
MB = 1 << 20


async def sigterm(launcher: Launcher, instance: Instance) -> float:
    """Send SIGTERM and wait for STOPPING=1; the time it arrived (the drain's start)."""
    mark = len(launcher.sink.messages)
    launcher.send_signal(signal.SIGTERM)
    message = await launcher.wait_for(
        instance, lambda m: m.has("STOPPING", "1"), timeout=10, start=mark
    )
    return message.received


async def exit_status(instance: Instance, timeout: float = 60) -> tuple[int, float]:
    """Wait for the process to exit: its status and when it was seen to exit."""
    status = await asyncio.wait_for(asyncio.shield(instance.exited), timeout)
    return status, time.monotonic()


async def read_headers(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers


async def read_until(reader: asyncio.StreamReader, marker: bytes, timeout: float) -> bytes:
    """Bytes up to and including ``marker`` (at most 1 MB), within ``timeout``."""
    got = b""
    async with asyncio.timeout(timeout):
        while marker not in got and len(got) < MB:
            chunk = await reader.read(65536)
            if not chunk:
                break
            got += chunk
    return got


# -- case 1: streams the app ends when the drain begins ---------------------------------


@pytest.mark.parametrize(
    "app",
    ["tests.apps.controlled:create_app", "sdserve.demo:create_app"],
    ids=["on_shutdown", "draining-event"],
)
async def test_event_stream_gets_its_goodbye_and_the_worker_exits_0_within_1s(
    make_launcher: LauncherFactory, port: int, app: str
) -> None:
    launcher = make_launcher(app=app)
    instance = await launcher.start()
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(request_bytes("/events"))
    status, headers = await read_headers(reader)
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert b"data:" in await read_until(reader, b"\n\n", 10)  # the stream has begun
    started = await sigterm(launcher, instance)
    tail = await read_until(reader, b"event: goodbye", 10)
    assert b"event: goodbye" in tail
    # the stream ended (its last chunk) and the connection closed after it
    assert (tail + await asyncio.wait_for(reader.read(), 5)).endswith(b"0\r\n\r\n")
    writer.close()
    code, exited = await exit_status(instance)
    assert code == ExitCode.OK, instance.log_text()
    print(f"\n{app}: goodbye sent, exit 0 {(exited - started) * 1000:.0f} ms after STOPPING=1")
    assert exited - started < 1.0, f"exited {exited - started:.2f}s after the drain began"
    assert "0 cancelled" in instance.log_text()


async def test_drain_hook_and_on_shutdown_run_at_drain_start_on_cleanup_after_the_last_request(
    make_launcher: LauncherFactory, port: int, gate: Gate, tmp_path: Path
) -> None:
    hooks = tmp_path / "hooks.log"
    launcher = make_launcher(env={"TESTAPP_HOOKS_LOG": str(hooks), "TESTAPP_SHUTDOWN_GATE": "1"})
    instance = await launcher.start()
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(request_bytes("/hold/slow"))
    await gate.wait_held("slow")
    await sigterm(launcher, instance)
    # on_shutdown runs while the request is still held: it does not wait for handlers
    await gate.wait_held("on-shutdown")
    gate.release("on-shutdown")
    gate.release("slow")
    response = await asyncio.wait_for(read_response(reader), 10)
    writer.close()
    assert response.status == 200
    assert response.closes
    code, _ = await exit_status(instance)
    assert code == ExitCode.OK
    assert hooks.read_text().split() == [
        "drain-hook-after-event",  # the event is set before the hooks run
        "shutdown-3",
        "shutdown-2",
        "shutdown-1",
        "request-slow",
        "cleanup-3",
        "cleanup-2",
        "cleanup-1",
    ]


# -- case 2: bytes sent during the idle grace -------------------------------------------


@pytest.mark.parametrize(
    "sent", [b"G", b"GET / HTTP/1.1\r\nHost: test\r\n"], ids=["one-byte", "partial-header"]
)
async def test_bytes_sent_during_the_grace_hold_the_drain_only_until_the_header_timeout(
    make_launcher: LauncherFactory, port: int, sent: bytes
) -> None:
    launcher = make_launcher(
        "--idle-grace", "1", "--header-timeout", "2", "--shutdown-timeout", "20"
    )
    instance = await launcher.start()
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(request_bytes("/"))
    assert not (await read_response(reader)).closes
    started = await sigterm(launcher, instance)
    writer.write(sent)
    # the request never completes: 408 at the header timeout, then the connection closes
    response = await asyncio.wait_for(read_response(reader), 10)
    assert response.status == 408
    assert response.closes
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    code, exited = await exit_status(instance)
    assert code == ExitCode.OK
    # bounded by idle_grace + header_timeout (3 s), not shutdown_timeout (20 s)
    assert exited - started < 1 + 2 + 1.0, f"drain took {exited - started:.2f}s"


# -- case 3: a response still being written ---------------------------------------------


@pytest.fixture
def big_file(tmp_path: Path) -> Path:
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(50 * MB))
    return path


async def start_download(
    launcher: Launcher, port: int
) -> tuple[Instance, asyncio.StreamReader, asyncio.StreamWriter, dict[str, str], bytes]:
    instance = await launcher.start()
    reader, writer = await asyncio.open_connection(HOST, port, limit=4 * MB)
    writer.write(request_bytes("/file"))  # keep-alive: the response is prepared that way
    status, headers = await read_headers(reader)
    assert status == 200
    first = await reader.readexactly(MB)  # the rest waits in the server (we stop reading)
    return instance, reader, writer, headers, first


async def test_download_begun_before_sigterm_completes_whole_and_its_connection_closes(
    make_launcher: LauncherFactory, port: int, big_file: Path
) -> None:
    launcher = make_launcher(
        "--idle-grace", "1", "--shutdown-timeout", "30", env={"TESTAPP_FILE": str(big_file)}
    )
    instance, reader, writer, headers, first = await start_download(launcher, port)
    assert headers.get("connection", "keep-alive").lower() != "close"
    size = int(headers["content-length"])
    assert size == 50 * MB
    started = await sigterm(launcher, instance)
    rest = await asyncio.wait_for(reader.readexactly(size - MB), 30)
    done = time.monotonic()
    assert first + rest == big_file.read_bytes()  # noqa: ASYNC240 - the test's own file
    # armed when the drain began: closed once written, not kept alive until the deadline
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    code, exited = await exit_status(instance)
    assert code == ExitCode.OK
    assert exited - done < 1.5, f"exit {exited - done:.2f}s after the body was read"
    assert exited - started < 30


async def test_slow_reader_of_a_download_is_cut_at_the_shutdown_timeout(
    make_launcher: LauncherFactory, port: int, big_file: Path
) -> None:
    launcher = make_launcher("--shutdown-timeout", "3", env={"TESTAPP_FILE": str(big_file)})
    instance, reader, writer, _headers, _first = await start_download(launcher, port)
    started = await sigterm(launcher, instance)
    code, exited = await exit_status(instance)  # the reader reads nothing meanwhile
    assert 3 - 0.1 <= exited - started < 3 + 2.0, f"exited {exited - started:.2f}s after"
    assert code == ExitCode.DRAIN_TIMEOUT, "a cut response is not a clean drain"
    assert "cutting a response still being written to ('127.0.0.1'" in instance.log_text()
    # what was sent arrives, then the connection ends short of the body
    received = 0
    async with asyncio.timeout(30):
        while chunk := await reader.read(MB):
            received += len(chunk)
    assert received < 49 * MB
    writer.close()


# -- case 4: pipelined requests ---------------------------------------------------------


async def test_three_pipelined_requests_with_sigterm_during_the_first_are_all_answered(
    make_launcher: LauncherFactory, port: int, gate: Gate
) -> None:
    launcher = make_launcher()
    instance = await launcher.start()
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(request_bytes("/hold/p1") + request_bytes("/") + request_bytes("/"))
    await gate.wait_held("p1")
    await sigterm(launcher, instance)
    gate.release("p1")
    responses = [await asyncio.wait_for(read_response(reader), 10) for _ in range(3)]
    assert [r.status for r in responses] == [200, 200, 200]
    assert responses[0].body == b"released p1\n"
    # only the last one read says close; then the connection ends
    assert [r.closes for r in responses] == [False, False, True]
    with pytest.raises(ProtocolError):
        await read_response(reader)
    writer.close()
    code, _ = await exit_status(instance)
    assert code == ExitCode.OK
    assert "drained 3 request(s)" in instance.log_text()
