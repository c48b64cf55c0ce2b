"""Overload, end to end: a real sdserve process, real sockets, `sdserve drill` in open loop.

- at 5x the capacity measured in the same test, the health probes pass and every
  refusal is a 503 with Retry-After that never reached the handler; each request has
  exactly one outcome (admitted, queued then admitted, or refused); refusals are
  answered as the request is read, on keep-alive connections that go on serving;
- a dependency whose latency jumps from 2 ms to 200 ms mid-run lowers the limit instead
  of letting the queue grow, STATUS= says the worker sheds, and once the dependency and
  the load are back to normal the limit rises again;
- admission control's bookkeeping engages only under pressure, counting the requests
  already in flight, and disengages when calm.
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import time
from typing import Any

import aiohttp
import pytest

from sdserve.drill import DrillSpec, Target, run_drill
from sdserve.drill.result import DrillResult
from tests.conftest import LauncherFactory
from tests.helpers import Gate, get

pytestmark = pytest.mark.asyncio
HOST = "127.0.0.1"
APP = "tests.apps.overload:create_app"
#: /control answers the tests' questions even under overload
ENV = {"SDSERVE_OVERLOAD__ENABLED": "true", "SDSERVE_OVERLOAD__CRITICAL_PATHS": "/control"}


async def stats(port: int) -> dict[str, Any]:
    response = await get(HOST, port, "/control/stats")
    assert response.status == 200, response
    data: dict[str, Any] = json.loads(response.body)
    return data


def codes(result: DrillResult) -> dict[int, int]:
    out: dict[int, int] = {}
    for code in result.code:
        out[int(code)] = out.get(int(code), 0) + 1
    return out


async def capacity(port: int, path: str) -> float:
    """Requests per second the worker completes, closed loop (measured, not assumed)."""
    spec = DrillSpec(
        targets=(Target(f"http://{HOST}:{port}{path}"),),
        duration=1.0,
        concurrency=4,
        processes=1,
    )
    result = await run_drill(spec)
    seen = codes(result)
    # a saturated worker may refuse a few (a request that waited past 5 ms for the loop)
    assert set(seen) <= {200, 503}, seen
    assert seen.get(200, 0) > seen.get(503, 0), seen
    return seen[200] / result.duration


async def test_at_5x_overload_probes_pass_and_refusals_are_503_before_the_handler(
    make_launcher: LauncherFactory, port: int, listen_sock: socket.socket
) -> None:
    admin = socket.create_server((HOST, 0))
    admin_port = admin.getsockname()[1]
    launcher = make_launcher(app=APP, env=ENV, sockets=[("http", listen_sock), ("admin", admin)])
    await launcher.start()
    admin.close()  # the server has its own copy
    cap = await capacity(port, "/cpu?ms=1")
    before = await stats(port)
    spec = DrillSpec(
        targets=(Target(f"http://{HOST}:{port}/cpu?ms=1"),),
        duration=2.0,
        rate=5 * cap,
        timeout=5.0,
        processes=2,
    )
    drill = asyncio.create_task(run_drill(spec))
    probes: list[int] = []
    sampled: list[tuple[int, dict[str, str]]] = []
    for _ in range(400):  # bounded: until the drill ends
        if drill.done():
            break
        for path in ("/livez", "/readyz"):
            probes.append((await get(HOST, port, path)).status)
            probes.append((await get(HOST, admin_port, path)).status)
        response = await get(HOST, port, "/cpu?ms=1")
        sampled.append((response.status, response.headers))
    result = await drill
    after = await stats(port)
    assert await launcher.stop() == 0

    # the probes were never shed, on the main socket or the admin one
    assert probes
    assert set(probes) == {200}, probes
    # refusals are 503 with Retry-After, and there were some (5x the capacity)
    seen = codes(result)
    assert set(seen) <= {200, 503}, seen
    assert seen.get(503, 0) > 0, seen
    for status, headers in sampled:
        assert status in (200, 503)
        if status == 503:
            assert headers["retry-after"] == "1"
            assert headers["x-sdserve-shed"] in ("queue deadline", "concurrency limit")
    # one outcome per request: the handler ran for each admitted one and no other
    adm_before, adm_after = before["admission"], after["admission"]
    admitted = adm_after["admitted"] - adm_before["admitted"]
    refused = sum(adm_after["rejected"].values()) - sum(adm_before["rejected"].values())
    handled = after["calls"]["/cpu"] - before["calls"]["/cpu"]
    sent = result.requests + len(sampled)
    ok = seen.get(200, 0) + sum(1 for s, _ in sampled if s == 200)
    shed = seen.get(503, 0) + sum(1 for s, _ in sampled if s == 503)
    assert admitted == handled + 1  # and the /control/stats request asking
    assert handled == ok
    assert refused == shed
    assert ok + shed == sent
    # a queued request that was refused at its deadline counts as refused, not admitted
    assert adm_after["expired"] <= refused
    # under sustained overload refusals are decided as the request is read, before any
    # task for it, and the drill's keep-alive connections carry on after them. How many
    # of them is the host's doing as much as sdserve's (measured: 82-85% on an idle 2-core
    # host, 40-85% with two CPU hogs beside it, 12% and 22% in two CI runs): the share is
    # no correctness property, the path and its answers are
    assert adm_after["shed_on_read"] - adm_before["shed_on_read"] > 0
    assert result.ka_server_closed == 0
    log = launcher.instances[-1].log_text()
    assert "shedding load" in log
    assert f"{adm_after['admitted']} admitted" in log


def phases(records: list[list[int]], slow_after: int, fast_after: int) -> dict[str, list[int]]:
    """The limit seen by each /io call, by phase of the dependency."""
    out: dict[str, list[int]] = {"fast": [], "slow": [], "again": []}
    for n, limit, _inflight, _queued in records:
        phase = "fast" if n <= slow_after else "slow" if n <= slow_after + fast_after else "again"
        out[phase].append(limit)
    return out


async def test_a_slow_dependency_lowers_the_limit_and_the_limit_rises_again(
    make_launcher: LauncherFactory, port: int
) -> None:
    slow_after, fast_after, rate = 400, 300, 250.0
    env = {
        **ENV,
        "TESTAPP_SLOW_AFTER": str(slow_after),
        "TESTAPP_FAST_AFTER": str(fast_after),
        "TESTAPP_IO_MS": "2",
        "TESTAPP_SLOW_MS": "200",
    }
    launcher = make_launcher(app=APP, env=env)
    instance = await launcher.start()
    spec = DrillSpec(
        targets=(Target(f"http://{HOST}:{port}/io"),),
        duration=30.0,  # upper bound: stopped once the three phases are through
        rate=rate,
        timeout=5.0,
        processes=1,
    )
    drill = asyncio.create_task(run_drill(spec))
    # the worker says it sheds while the dependency is slow
    shedding = await launcher.wait_for(
        instance, lambda m: "shedding" in m.fields.get("STATUS", ""), timeout=30
    )
    assert shedding.fields["STATUS"].startswith("ready; shedding load (concurrency limit ")
    await launcher.wait_for(
        instance, lambda m: m.fields.get("STATUS", "") == "ready", timeout=30
    )  # and says so no longer once it is fast again
    data = await stats(port)
    drill.cancel()
    with pytest.raises(asyncio.CancelledError):
        await drill
    assert await launcher.stop() == 0

    records = data["records"]
    by_phase = phases(records, slow_after, fast_after)
    assert by_phase["fast"]
    assert by_phase["slow"]
    assert by_phase["again"]
    at_jump = by_phase["fast"][-1]
    lowest = min(by_phase["slow"])
    # the limit fell (without it, in flight would grow to rate x 200 ms = 50)
    assert lowest < at_jump / 2, (at_jump, by_phase["slow"])
    slow = [r for r in records if slow_after < r[0] <= slow_after + fast_after]
    late = slow[len(slow) // 2 :]
    assert max(r[2] for r in late) <= max(r[1] for r in late) + 1  # in flight within it
    assert max(r[3] for r in slow) <= 128  # the queue stayed within its bound
    assert statistics.mean(r[2] for r in late) < rate * 0.2 / 2
    # and it rose again once the dependency was fast and the load low again
    assert by_phase["again"][-1] > lowest
    log = launcher.instances[-1].log_text()
    assert "no longer shedding load" in log


async def test_admission_engages_only_under_pressure(
    make_launcher: LauncherFactory, port: int
) -> None:
    """A worker that keeps up lets requests in without the bookkeeping (counted all the
    same); ten requests in flight (half the initial limit) engage it, and it
    counts those from then on; once calm for ten windows it disengages, every request
    it counted released."""
    launcher = make_launcher(app=APP, env={"SDSERVE_OVERLOAD__ENABLED": "true"})
    await launcher.start()
    sent = 0
    for _ in range(40):
        assert (await get(HOST, port, "/cpu?ms=0")).status == 200
        sent += 1
    sent += 1
    adm = (await stats(port))["admission"]
    assert adm["engaged"] is False
    assert adm["engagements"] == 0
    assert adm["admitted"] == sent
    assert (await get(HOST, port, "/livez")).status == 200  # a probe: not counted
    async with aiohttp.ClientSession() as session:
        held = [await session.get(f"http://{HOST}:{port}/hold") for _ in range(10)]
        sent += 10
        assert [r.status for r in held] == [200] * 10  # their handlers wait: in flight
        sent += 1
        adm = (await stats(port))["admission"]
        assert adm["engaged"] is True
        assert adm["engagements"] == 1
        assert adm["inflight"] == 11  # the ten, counted from then on, and this request
        assert (await get(HOST, port, "/release")).status == 200
        sent += 1
        assert [await r.text() for r in held] == ["released\n"] * 10
    engaged = True
    # ten calm windows of at least 100 ms take about 1 s, however fast the requests go:
    # bounded in time and in requests
    deadline = time.monotonic() + 20
    for _ in range(2000):
        if time.monotonic() > deadline:
            break
        for _ in range(30):
            assert (await get(HOST, port, "/cpu?ms=0")).status == 200
            sent += 1
        sent += 1
        adm = (await stats(port))["admission"]
        engaged = adm["engaged"]
        if not engaged:
            break
    assert engaged is False, adm
    assert adm["inflight"] == 0  # all it counted were released
    assert adm["engagements"] == 1
    assert adm["admitted"] == sent
    assert sum(adm["rejected"].values()) == 0
    assert await launcher.stop() == 0


async def test_max_concurrency_holds_from_the_moment_the_bookkeeping_engages(
    make_launcher: LauncherFactory, port: int, gate: Gate
) -> None:
    """A hard cap of 2 with admission control on: the second request in flight engages it
    (half the limit of 2), and the first, let in before, is counted; so a third waits in
    the queue and is refused at its deadline, and never reaches its handler."""
    launcher = make_launcher("--max-concurrency", "2", env={"SDSERVE_OVERLOAD__ENABLED": "true"})
    instance = await launcher.start()
    held = [asyncio.create_task(get(HOST, port, f"/hold/{n}")) for n in ("a", "b")]
    for n in ("a", "b"):
        await gate.wait_held(n)
    refused = await get(HOST, port, "/hold/c")
    assert refused.status == 503
    assert refused.headers["x-sdserve-shed"] == "queue deadline"
    assert refused.headers["retry-after"] == "1"
    assert "c" not in gate.held  # its handler never ran
    assert (await get(HOST, port, "/livez")).status == 200  # probes are never shed
    for n in ("a", "b"):
        gate.release(n)
    assert [r.status for r in await asyncio.gather(*held)] == [200, 200]
    assert await launcher.stop() == 0
    assert "queue_deadline 1" in instance.log_text()  # the one refusal, at its deadline


async def plain_requests_held_to_two(port: int, gate: Gate) -> None:
    """Two plain requests held in their handlers fill a limit of 2: a third gets 503 and
    never reaches its handler; the two are answered once released."""
    held = [asyncio.create_task(get(HOST, port, f"/hold/{n}")) for n in ("a", "b")]
    for n in ("a", "b"):
        await gate.wait_held(n)
    refused = await get(HOST, port, "/hold/c")
    assert refused.status == 503
    assert "c" not in gate.held
    for n in ("a", "b"):
        gate.release(n)
    assert [r.status for r in await asyncio.gather(*held)] == [200, 200]


@pytest.mark.parametrize("admission", ["true", "false"])
async def test_event_streams_are_not_held_by_the_concurrency_limit(
    make_launcher: LauncherFactory, port: int, gate: Gate, admission: str
) -> None:
    """A stream of server-sent events lasts as long as its client: counted in flight until
    it ends, two would hold a limit of 2 for good. Once its headers are out it is not
    counted: three streams run, plain requests are still held to the limit, and the
    streams end at the stop (their goodbye) with every request answered. (Other streams
    are work that ends, and stay counted: test_admission_engages_only_under_pressure.)"""
    env = {"SDSERVE_OVERLOAD__ENABLED": admission}
    launcher = make_launcher("--max-concurrency", "2", env=env)
    await launcher.start()
    async with aiohttp.ClientSession() as session:
        streams = [await session.get(f"http://{HOST}:{port}/events") for _ in range(3)]
        for stream in streams:
            assert stream.status == 200
            assert await asyncio.wait_for(stream.content.readline(), 10) == b"data: hello\n"
        await plain_requests_held_to_two(port, gate)
        assert (await get(HOST, port, "/")).status == 200  # the streams hold no place
        stopping = asyncio.create_task(launcher.stop())
        for stream in streams:  # the drain ends them with their goodbye
            rest = await asyncio.wait_for(stream.content.read(), 10)
            assert b"event: goodbye" in rest
            stream.release()
        assert await stopping == 0


@pytest.mark.parametrize("admission", ["true", "false"])
async def test_websockets_are_not_held_by_the_concurrency_limit(
    make_launcher: LauncherFactory, port: int, gate: Gate, admission: str
) -> None:
    """A WebSocket lives as long as its client: counted in flight, two would hold a limit
    of 2 for good (and their lifetimes would be taken for the service's latency). With
    admission control on, and with the static cap alone, three WebSockets are let through
    and echo, and plain requests are still held to the limit."""
    env = {"SDSERVE_OVERLOAD__ENABLED": admission}
    launcher = make_launcher("--max-concurrency", "2", env=env)
    await launcher.start()
    async with aiohttp.ClientSession() as session:
        sockets = [await session.ws_connect(f"http://{HOST}:{port}/ws") for _ in range(3)]
        for i, ws in enumerate(sockets):
            await ws.send_str(f"hello {i}")
            assert await ws.receive_str(timeout=10) == f"hello {i}"
        await plain_requests_held_to_two(port, gate)
        for ws in sockets:
            await ws.send_str("still there")
            assert await ws.receive_str(timeout=10) == "still there"
            await ws.close()
    assert await launcher.stop() == 0
