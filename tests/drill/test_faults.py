"""The drill's counts equal what deliberately faulty servers record doing."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from sdserve.drill import DrillResult, DrillSpec, Target, run_drill
from sdserve.drill.outcome import EOF, REFUSED, RESET, TIMEOUT
from tests.drill.servers import FaultyServer

StartServer = Callable[..., FaultyServer]


def drill_view(result: DrillResult) -> dict[str, int]:
    """The drill's counts in the server's vocabulary."""
    out: dict[str, int] = {}
    names = {RESET: "reset", EOF: "eof", TIMEOUT: "hang", REFUSED: "refused"}
    values, counts = np.unique(result.code, return_counts=True)
    for code, n in zip(values.tolist(), counts.tolist(), strict=True):
        out[names.get(code, str(code))] = n
    return out


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("fault", "args", "what"),
    [
        ("reset", ["--every", "7"], "reset"),
        ("eof", ["--every", "5"], "eof"),
        ("status", ["--every", "4", "--code", "503"], "503"),
        ("status", ["--every", "3", "--code", "500"], "500"),
        ("status", ["--every", "6", "--code", "404"], "404"),
        ("hang", ["--every", "9"], "hang"),
    ],
)
@pytest.mark.parametrize("keepalive", [1.0, 0.5, 0.0])
async def test_counts_equal_server_records(
    faulty: StartServer, fault: str, args: list[str], what: str, keepalive: float
) -> None:
    server = faulty(fault, *args)
    spec = DrillSpec(
        targets=(Target(server.url),),
        duration=1.0,
        concurrency=6,
        keepalive=keepalive,
        timeout=1.0 if fault == "hang" else 10.0,  # a hang waits this long
        processes=2,
    )
    result = await run_drill(spec)
    records = server.stop()
    assert records["counts"].get(what, 0) > 0, "the fault never happened"
    assert drill_view(result) == records["counts"]
    assert result.requests == records["requests"]
    counts = result.counts()
    assert counts["failures"] == counts["requests"] - records["counts"]["200"]
    if what == "404":
        assert counts["classes"]["other_status"] == records["counts"]["404"]
    elif what in ("503", "500"):
        assert counts["status_5xx"] == {what: records["counts"][what]}
        assert counts["classes"]["5xx"] == records["counts"][what]


@pytest.mark.asyncio
async def test_open_loop_counts_equal_server_records(faulty: StartServer) -> None:
    server = faulty("status", "--every", "10", "--code", "503")
    spec = DrillSpec(
        targets=(Target(server.url),),
        duration=1.0,
        rate=400,
        keepalive=0.5,
        processes=2,
    )
    result = await run_drill(spec)
    records = server.stop()
    assert result.requests == 400
    assert records["requests"] == 400
    assert drill_view(result) == records["counts"]
    assert records["counts"]["503"] == 40


@pytest.mark.asyncio
async def test_refused_only_while_the_server_refuses(faulty: StartServer) -> None:
    server = faulty("refuse", "--every", "20", "--window", "0.3")
    spec = DrillSpec(
        targets=(Target(server.url),),
        duration=1.2,
        concurrency=1,
        keepalive=0.0,
        processes=1,
    )
    result = await run_drill(spec)
    records = server.stop()
    (begin, end) = records["windows"][0]
    view = drill_view(result)
    assert view["refused"] > 0
    assert view == {"200": records["counts"]["200"], "refused": view["refused"]}
    assert result.requests == records["requests"] + view["refused"]
    refused = result.code == REFUSED
    sent = result.t0 + result.start
    assert np.all((sent[refused] >= begin) & (sent[refused] <= end))
    # every request sent inside the window (after the one that opened it) was refused
    inside = (sent > begin) & (result.t0 + result.start + result.latency < end)
    assert np.all(refused[inside])


@pytest.mark.asyncio
async def test_open_loop_latency_counts_from_the_intended_send_time(
    faulty: StartServer,
) -> None:
    """No coordinated omission: requests due during a stall wait for its end."""
    stall = 0.4
    server = faulty("stall", "--every", "100", "--window", str(stall))
    spec = DrillSpec(
        targets=(Target(server.url),),
        duration=1.5,
        rate=300,
        keepalive=0.0,
        processes=1,
    )
    result = await run_drill(spec)
    records = server.stop()
    assert result.failures == 0
    (begin, end) = records["windows"][0]
    sent = result.t0 + result.start
    during = (sent > begin + 0.01) & (sent < end - 0.05)
    assert during.sum() >= 0.8 * 300 * (stall - 0.06)
    # each of them finished no earlier than the end of the stall, measured from when it
    # was due: latency >= end - intended
    waited = result.latency[during] - (end - sent[during])
    assert np.all(waited >= -0.002)
    assert result.latency.max() >= stall - 0.05


@pytest.mark.asyncio
async def test_requests_over_the_inflight_limit_are_not_sent_and_not_counted(
    faulty: StartServer,
) -> None:
    """At its in-flight limit an open-loop drill skips sends and says so, apart."""
    server = faulty("hang", "--every", "1")
    spec = DrillSpec(
        targets=(Target(server.url),),
        duration=1.0,
        rate=100,
        timeout=3.0,
        processes=1,
        max_inflight=5,
    )
    result = await run_drill(spec)
    records = server.stop()
    assert result.requests == 5 == records["counts"]["hang"]
    assert result.not_sent == 95
    assert drill_view(result) == {"hang": 5}
