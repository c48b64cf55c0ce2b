"""The core daemon through the launcher: real processes, sockets, signals and notify messages."""

from __future__ import annotations

import asyncio
import itertools
import signal
import socket
import time
from pathlib import Path

import aiohttp
import pytest

from sdserve.exitcodes import ExitCode
from tests.conftest import LauncherFactory
from tests.helpers import Gate, ProtocolError, get, load, read_response, request_bytes

pytestmark = pytest.mark.asyncio
HOST = "127.0.0.1"


async def test_ready_waits_for_check_and_early_connection_is_served(
    make_launcher: LauncherFactory, port: int, tmp_path: Path
) -> None:
    flag = tmp_path / "dependency-up"
    launcher = make_launcher("--retry-max", "0.2", env={"TESTAPP_READY_FILE": str(flag)})
    instance = await launcher.spawn()
    waiting = await launcher.wait_for(
        instance, lambda m: "waiting for flag-file" in m.fields.get("STATUS", ""), timeout=20
    )
    assert not any(m.has("READY", "1") for m in launcher.sink.messages)
    # A connection made before READY=1 sits in the kernel queue: not refused, not reset.
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(request_bytes("/", close=True))
    response_task = asyncio.create_task(read_response(reader))
    # EXTEND_TIMEOUT_USEC= keeps systemd waiting while the check is retried
    await launcher.wait_for(instance, lambda m: "EXTEND_TIMEOUT_USEC" in m.fields, timeout=20)
    assert not response_task.done()
    flag.touch()
    ready = await launcher.wait_for(instance, lambda m: m.has("READY", "1"), timeout=20)
    response = await asyncio.wait_for(response_task, 10)
    writer.close()
    assert response.status == 200
    assert ready.received > waiting.received
    await launcher.stop()


async def test_sigterm_lets_in_flight_request_finish(
    make_launcher: LauncherFactory, port: int, gate: Gate
) -> None:
    launcher = make_launcher()
    instance = await launcher.start()
    request = asyncio.create_task(get(HOST, port, "/hold/a"))
    await gate.wait_held("a")
    mark = len(launcher.sink.messages)
    launcher.send_signal(signal.SIGTERM)
    await launcher.wait_for(instance, lambda m: m.has("STOPPING", "1"), timeout=10, start=mark)
    assert not request.done()
    gate.release("a")
    response = await request
    assert response.status == 200
    assert response.body == b"released a\n"
    assert response.closes, "a response written during the drain carries Connection: close"
    assert await launcher.stop() == 0
    assert "drained 1 request(s)" in instance.log_text()


async def test_connection_after_sigterm_waits_for_next_instance(
    make_launcher: LauncherFactory, port: int, gate: Gate
) -> None:
    launcher = make_launcher()
    first = await launcher.start()
    held = asyncio.create_task(get(HOST, port, "/hold/a"))
    await gate.wait_held("a")
    launcher.send_signal(signal.SIGTERM)
    await launcher.wait_for(first, lambda m: m.has("STOPPING", "1"), timeout=10)
    late = asyncio.create_task(get(HOST, port, "/", timeout=30))
    gate.release("a")
    assert (await held).status == 200
    assert await launcher.stop() == 0
    second = await launcher.start()
    response = await late
    assert response.status == 200
    served_by = int(response.body.split()[1])
    assert served_by in (first.pid, second.pid)
    await launcher.stop()


async def test_connection_accepted_just_before_drain_is_served(
    make_launcher: LauncherFactory, port: int
) -> None:
    launcher = make_launcher("--idle-grace", "5")
    instance = await launcher.start()
    reader, writer = await asyncio.open_connection(HOST, port)  # connected, nothing sent
    # The accept queue is FIFO: once a later connection is answered, ours was accepted.
    assert (await get(HOST, port, "/")).status == 200
    launcher.send_signal(signal.SIGTERM)
    await launcher.wait_for(instance, lambda m: m.has("STOPPING", "1"), timeout=10)
    writer.write(request_bytes("/"))
    response = await asyncio.wait_for(read_response(reader), 10)
    writer.close()
    assert response.status == 200
    assert response.closes
    assert await launcher.stop() == 0


async def test_long_idle_connection_is_closed_as_the_drain_starts(
    make_launcher: LauncherFactory, port: int
) -> None:
    launcher = make_launcher("--idle-grace", "5", "--drain-delay", "6")
    instance = await launcher.start()
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(request_bytes("/"))
    assert (await read_response(reader)).status == 200
    # idle for longer than the grace before the drain starts (the drain delay covers it)
    launcher.send_signal(signal.SIGTERM)
    await launcher.wait_for(instance, lambda m: m.has("STOPPING", "1"), timeout=10)
    stopping = time.monotonic()
    assert await asyncio.wait_for(reader.read(1), 20) == b""
    closed_after = time.monotonic() - stopping
    # closed as the drain starts (6 s), not a grace later (11 s)
    assert 5.5 <= closed_after < 9.5, closed_after
    writer.close()
    assert await launcher.stop() == 0
    assert "1 idle connection(s) closed" in instance.log_text()


async def test_idle_keepalive_gets_grace_then_is_closed(
    make_launcher: LauncherFactory, port: int
) -> None:
    launcher = make_launcher("--idle-grace", "2")
    instance = await launcher.start()
    reused_r, reused_w = await asyncio.open_connection(HOST, port)
    idle_r, idle_w = await asyncio.open_connection(HOST, port)
    for r, w in ((reused_r, reused_w), (idle_r, idle_w)):
        w.write(request_bytes("/"))
        first = await read_response(r)
        assert first.status == 200
        assert not first.closes
    last_request = time.monotonic()
    launcher.send_signal(signal.SIGTERM)
    await launcher.wait_for(instance, lambda m: m.has("STOPPING", "1"), timeout=10)
    # A client reusing its idle connection within the grace is answered, with close.
    reused_w.write(request_bytes("/"))
    second = await asyncio.wait_for(read_response(reused_r), 10)
    assert second.status == 200
    assert second.closes
    # A connection that stays idle is closed cleanly (EOF, not reset) once it has been
    # idle for the grace, counted from its last request.
    assert await asyncio.wait_for(idle_r.read(1), 10) == b""
    assert time.monotonic() - last_request >= 2 - 0.05
    for w in (reused_w, idle_w):
        w.close()
    assert await launcher.stop() == 0


async def test_second_signal_exits_at_once(
    make_launcher: LauncherFactory, port: int, gate: Gate
) -> None:
    launcher = make_launcher()
    instance = await launcher.start()
    held = asyncio.create_task(get(HOST, port, "/hold/a"))
    await gate.wait_held("a")
    launcher.send_signal(signal.SIGTERM)
    await launcher.wait_for(instance, lambda m: m.has("STOPPING", "1"), timeout=10)
    began = time.monotonic()
    launcher.send_signal(signal.SIGINT)
    status = await launcher.stop(timeout=10)
    assert status == ExitCode.FORCED
    assert time.monotonic() - began < 5
    assert "second stop signal" in instance.log_text()
    with pytest.raises((ProtocolError, ConnectionError)):
        await held


async def test_request_past_deadline_is_cancelled_and_reported(
    make_launcher: LauncherFactory, port: int, gate: Gate
) -> None:
    launcher = make_launcher("--shutdown-timeout", "1", "--idle-grace", "0.1")
    instance = await launcher.start()
    held = asyncio.create_task(get(HOST, port, "/hold/forever"))
    await gate.wait_held("forever")
    status = await launcher.stop(timeout=20)
    assert status == ExitCode.DRAIN_TIMEOUT
    log = instance.log_text()
    assert "cancelling request past the shutdown deadline: GET /hold/forever" in log
    assert "1 cancelled" in log
    with pytest.raises((ProtocolError, ConnectionError)):
        await held


async def test_websocket_closed_with_1001(make_launcher: LauncherFactory, port: int) -> None:
    launcher = make_launcher()
    instance = await launcher.start()
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"http://{HOST}:{port}/ws") as ws,
    ):
        await ws.send_str("hello")
        assert (await ws.receive_str(timeout=10)) == "hello"
        launcher.send_signal(signal.SIGTERM)
        msg = await ws.receive(timeout=10)
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert msg.data == aiohttp.WSCloseCode.GOING_AWAY
    assert await launcher.stop() == 0
    assert "1 websocket(s) closed with 1001" in instance.log_text()


async def test_cleanup_hooks_run_in_reverse_order(
    make_launcher: LauncherFactory, tmp_path: Path
) -> None:
    hooks = tmp_path / "hooks.log"
    launcher = make_launcher(env={"TESTAPP_HOOKS_LOG": str(hooks)})
    await launcher.start()
    assert await launcher.stop() == 0
    assert hooks.read_text().split() == [
        "drain-hook-after-event",
        "shutdown-3",
        "shutdown-2",
        "shutdown-1",
        "cleanup-3",
        "cleanup-2",
        "cleanup-1",
    ]


async def test_tcp_nodelay_on_connections_from_inherited_socket(
    make_launcher: LauncherFactory, port: int, listen_sock: socket.socket
) -> None:
    listen_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
    launcher = make_launcher()
    await launcher.start()
    response = await get(HOST, port, "/nodelay")
    assert response.body.strip() == b"1"
    await launcher.stop()


@pytest.mark.slow
async def test_twenty_stop_start_cycles_under_load_lose_nothing(
    make_launcher: LauncherFactory, port: int
) -> None:
    launcher = make_launcher()
    await launcher.start()
    async with load(HOST, port, keepalive=8, newconn=8) as stats:
        for _ in range(20):
            before = stats.total_ok
            assert await launcher.stop() == 0
            await launcher.start()
            # wait until the new instance has served real traffic before the next cycle
            await stats.wait_ok(before + 50, timeout=30)
    assert await launcher.stop() == 0
    print(f"\n20 stop/start cycles: ok={dict(stats.ok)} failed={dict(stats.failed)}")
    assert stats.ok["keepalive"] > 0
    assert stats.ok["newconn"] > 0
    assert not stats.failed, dict(stats.failed)


async def test_drain_delay_keeps_serving_while_not_ready(
    make_launcher: LauncherFactory, port: int
) -> None:
    launcher = make_launcher("--drain-delay", "3")
    instance = await launcher.start()
    assert (await get(HOST, port, "/readyz")).status == 200
    launcher.send_signal(signal.SIGTERM)
    await launcher.wait_for(instance, lambda m: m.has("STOPPING", "1"), timeout=10)
    # during the delay: still accepting and serving, but reporting not ready
    assert (await get(HOST, port, "/readyz")).status == 503
    assert (await get(HOST, port, "/")).status == 200
    assert await launcher.stop(timeout=30) == 0


async def test_overload_is_shed_with_503_and_retry_after(
    make_launcher: LauncherFactory, port: int, gate: Gate
) -> None:
    launcher = make_launcher("--max-concurrency", "2")
    await launcher.start()
    held = [asyncio.create_task(get(HOST, port, f"/hold/{n}")) for n in ("a", "b")]
    for n in ("a", "b"):
        await gate.wait_held(n)
    shed = await get(HOST, port, "/")
    assert shed.status == 503
    assert shed.headers["retry-after"] == "1"
    assert (await get(HOST, port, "/livez")).status == 200  # probes are never shed
    for n in ("a", "b"):
        gate.release(n)
    assert [r.status for r in await asyncio.gather(*held)] == [200, 200]
    assert (await get(HOST, port, "/")).status == 200
    assert await launcher.stop() == 0


async def test_watchdog_pings_stop_while_the_loop_is_blocked(
    make_launcher: LauncherFactory, port: int
) -> None:
    launcher = make_launcher(
        app="sdserve.demo:create_app", env={"WATCHDOG_USEC": "200000", "DEMO_ALLOW_BLOCK": "1"}
    )
    instance = await launcher.start()

    def pings() -> list[float]:
        return [m.received for m in launcher.sink.messages if m.has("WATCHDOG", "1")]

    # pings every 0.1 s (half of WATCHDOG_USEC), from the event loop
    mark = len(launcher.sink.messages)
    for _ in range(3):
        await launcher.wait_for(instance, lambda m: m.has("WATCHDOG", "1"), timeout=5, start=mark)
        mark = len(launcher.sink.messages)
    blocked = asyncio.create_task(get(HOST, port, "/block?ms=1000"))
    assert (await blocked).status == 200
    await launcher.wait_for(instance, lambda m: m.has("WATCHDOG", "1"), timeout=5, start=mark)
    times = pings()
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) >= 0.9, gaps  # no ping while the handler held the loop
    assert sorted(gaps)[len(gaps) // 2] < 0.3  # otherwise every ~0.1 s
    assert await launcher.stop() == 0


async def test_demo_has_no_block_route_unless_asked(
    make_launcher: LauncherFactory, port: int
) -> None:
    """Issue 10, case 4: anyone who reached the packaged demo could stall it with /block."""
    launcher = make_launcher(app="sdserve.demo:create_app")
    await launcher.start()
    assert (await get(HOST, port, "/block?ms=1000")).status == 404
    assert await launcher.stop() == 0


async def test_an_app_route_on_a_health_path_is_a_clear_start_failure(
    make_launcher: LauncherFactory,
) -> None:
    launcher = make_launcher(app="tests.apps.own_health:create_app")
    instance = await launcher.spawn()
    assert await asyncio.wait_for(asyncio.shield(instance.exited), 60) == ExitCode.STARTUP
    log = instance.log_text()
    assert "health.livez_path: the application already has a route GET /livez" in log, log
    assert "RuntimeError" not in log
