"""The health endpoints and the monitor in-process, on real sockets and a real notify socket."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer

from sdserve import health
from sdserve.checks import Check, CheckRegistry, CheckResult
from sdserve.config import HealthConfig
from sdserve.launcher import NotifySink
from sdserve.monitor import CheckMonitor
from sdserve.notify import Notifier
from sdserve.state import Phase, WorkerState


def result(name: str, ok: bool, output: str = "", critical: bool = True) -> CheckResult:
    return CheckResult(name, ok, output, 0.0123, time.time(), critical)


@dataclass
class Probe:
    state: WorkerState
    main: TestServer
    admin: TestServer
    session: aiohttp.ClientSession
    calls: list[str]

    async def get(
        self, path: str, *, admin: bool = False, headers: dict[str, str] | None = None
    ) -> tuple[int, str, str]:
        server = self.admin if admin else self.main
        url = f"http://127.0.0.1:{server.port}{path}"
        async with self.session.get(url, headers=headers) as resp:
            return resp.status, resp.headers["Content-Type"], await resp.text()


async def _serve(state: WorkerState, config: HealthConfig, admin: bool) -> TestServer:
    app = web.Application()
    health.install(app, state, config, admin=admin)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


@pytest_asyncio.fixture
async def probe() -> AsyncIterator[Callable[..., asyncio.Future[Probe]]]:
    made: list[Probe] = []

    async def make(config: HealthConfig | None = None) -> Probe:
        config = config or HealthConfig()
        calls: list[str] = []

        def counted(name: str) -> Callable[[], asyncio.Future[object]]:
            async def run() -> object:
                calls.append(name)  # a probe must never get here
                return True

            return run  # type: ignore[return-value]

        reg = CheckRegistry(secrets={"hunter2"})
        reg.add(Check("db", counted("db"), component_type="datastore"))
        reg.add(Check("cache", counted("cache"), critical=False, component_type="datastore"))
        reg.add(Check("queue", counted("queue")))
        state = WorkerState(registry=reg, phase=Phase.READY, ready_at=time.monotonic())
        state.record([result("db", True, "PostgreSQL 15"), result("cache", True, "PONG")])
        state.record([result("queue", True, "ok")])
        main = await _serve(state, config, admin=False)
        admin = await _serve(state, config, admin=True)
        p = Probe(state, main, admin, aiohttp.ClientSession(), calls)
        made.append(p)
        return p

    yield make  # type: ignore[misc]
    for p in made:
        await p.session.close()
        await p.main.close()
        await p.admin.close()


@pytest.mark.asyncio
async def test_k8s_style_text(probe: Callable[..., asyncio.Future[Probe]]) -> None:
    p = await probe()
    assert await p.get("/readyz") == (200, "text/plain; charset=utf-8", "ok\n")
    _, _, body = await p.get("/readyz?verbose", admin=True)
    assert body == (
        "[+]phase ok\n[+]db ok (12.3ms)\n[+]cache ok (12.3ms)\n[+]queue ok (12.3ms)\n"
        "readyz check passed\n"
    )
    _, _, body = await p.get("/readyz?verbose")
    assert body == "[+]phase ok\n[+]db ok\n[+]cache ok\n[+]queue ok\nreadyz check passed\n"
    # a critical check past its threshold: 503, names listed even without ?verbose
    p.state.record([result("db", False, "connection refused to hunter2@db")])
    p.state.unready.add("db")
    status, _, body = await p.get("/readyz")
    assert status == 503
    assert body == (
        "[+]phase ok\n[-]db failed: reason withheld\n[+]cache ok\n[+]queue ok\n"
        "readyz check failed\n"
    )
    status, _, body = await p.get("/readyz", admin=True)
    assert "[-]db failed: connection refused to ***@db (1 failure(s) in a row)" in body
    assert "hunter2" not in body
    # ?exclude=NAME (repeatable or comma-separated) leaves it out; phase can't be excluded
    status, _, body = await p.get("/readyz?exclude=db&exclude=nope,phase&verbose")
    assert status == 200
    assert body.endswith(
        '[+]db excluded: ok\nwarn: some health checks cannot be excluded: no matches for "nope", '
        '"phase"\nreadyz check passed\n'
    )
    assert p.calls == []


@pytest.mark.asyncio
async def test_warn_below_threshold_and_for_optional_checks(
    probe: Callable[..., asyncio.Future[Probe]],
) -> None:
    p = await probe()
    p.state.record([result("queue", False, "slow"), result("cache", False, "down", False)])
    status, _, body = await p.get("/readyz?verbose", admin=True)
    assert status == 200
    assert "[!]queue warn: slow (1 of 3 failures before not ready)" in body
    assert "[!]cache warn: down (optional)" in body
    assert body.endswith("readyz check passed\n")
    # recovering: passing again, but not yet pass_threshold times
    p.state.unready.add("queue")
    p.state.record([result("queue", True, "ok")])
    status, _, body = await p.get("/readyz?verbose", admin=True)
    assert status == 503
    assert "[-]queue failed: recovering: 1 of 1 passes" in body


@pytest.mark.asyncio
async def test_health_json(probe: Callable[..., asyncio.Future[Probe]]) -> None:
    p = await probe()
    p.state.record([result("cache", False, "down", False)])
    for path, headers in (
        ("/readyz?format=json", None),
        ("/readyz", {"Accept": "application/health+json"}),
    ):
        status, ctype, body = await p.get(path, admin=True, headers=headers)
        assert (status, ctype) == (200, "application/health+json; charset=utf-8")
        doc = json.loads(body)
        assert doc["status"] == "warn"
        db = doc["checks"]["db:responseTime"][0]
        assert db["componentId"] == "db"
        assert db["componentType"] == "datastore"
        assert db["status"] == "pass"
        assert db["observedValue"] == 12.3
        assert db["observedUnit"] == "ms"
        assert db["output"] == "PostgreSQL 15"
        assert db["time"].endswith("Z")
        assert doc["checks"]["cache:responseTime"][0]["status"] == "warn"
        assert doc["checks"]["phase:state"][0]["status"] == "pass"
    # the main socket: statuses only
    _, _, body = await p.get("/readyz?format=json")
    db = json.loads(body)["checks"]["db:responseTime"][0]
    assert db == {"componentId": "db", "componentType": "datastore", "status": "pass"}
    p.state.phase = Phase.DRAINING
    status, _, body = await p.get("/readyz?format=json")
    assert status == 503
    assert json.loads(body)["status"] == "fail"
    assert json.loads(body)["output"] == "failing: phase"
    assert p.calls == []


@pytest.mark.asyncio
async def test_details_on_main_and_startupz(probe: Callable[..., asyncio.Future[Probe]]) -> None:
    p = await probe(HealthConfig(details_on_main=True))
    _, _, body = await p.get("/readyz?verbose")
    assert "[+]db ok (12.3ms)" in body
    assert await p.get("/startupz") == (200, "text/plain; charset=utf-8", "ok\n")
    p.state.ready_at = None
    p.state.phase = Phase.STARTING
    status, _, body = await p.get("/startupz?verbose")
    assert status == 503
    assert body == "[-]started failed: starting\nstartupz check failed\n"


# -- the monitor -----------------------------------------------------------------------------


@pytest_asyncio.fixture
async def sink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[NotifySink]:
    s = NotifySink(tmp_path / "notify.sock")
    # both notifier back ends read NOTIFY_SOCKET from the process environment
    monkeypatch.setenv("NOTIFY_SOCKET", str(s.path))
    yield s
    s.close()


class Scripted:
    """A check whose outcome the test hands in run by run."""

    def __init__(self) -> None:
        self.started: asyncio.Queue[int] = asyncio.Queue()
        self.outcomes: asyncio.Queue[bool] = asyncio.Queue()
        self.runs = 0

    async def __call__(self) -> str:
        self.runs += 1
        await self.started.put(self.runs)
        if not await self.outcomes.get():
            raise ConnectionError("refused")
        return "fine"


@pytest.mark.asyncio
async def test_readiness_hysteresis_and_status(sink: NotifySink) -> None:
    scripted = Scripted()
    reg = CheckRegistry()
    reg.add(Check("db", scripted, timeout=30, interval=0.01))
    state = WorkerState(registry=reg, phase=Phase.READY, ready_at=time.monotonic())
    state.record([result("db", True)])
    notifier = Notifier()
    monitor = CheckMonitor(state, reg, HealthConfig(fail_threshold=3, pass_threshold=2), notifier)
    monitor.start()
    script = [
        (False, True),  # 1 failure: still ready
        (False, True),
        (True, True),  # a pass resets the count
        (False, True),
        (False, True),
        (False, False),  # 3 in a row: not ready
        (True, False),  # 1 pass: still not ready (pass_threshold 2)
        (False, False),
        (True, False),
        (True, True),  # 2 in a row: ready again
    ]
    try:
        await asyncio.wait_for(scripted.started.get(), 10)
        for outcome, ready_after in script:
            await scripted.outcomes.put(outcome)
            # the next run starting means this one was applied (runs never overlap)
            await asyncio.wait_for(scripted.started.get(), 10)
            assert state.accepting_traffic is ready_after, (outcome, state.streaks)
    finally:
        await monitor.stop()
        monitor.close()
        notifier.flush(timeout=1)
    assert monitor.running == 0
    statuses = [m.fields["STATUS"] for m in sink.messages if "STATUS" in m.fields]
    # STATUS= follows every change; readiness itself moved only at the thresholds
    assert statuses == [
        "ready; failing: db",
        "ready",
        "ready; failing: db",
        "not ready: db (ConnectionError: refused) failing",
        "not ready: db (recovering) failing",
        "not ready: db (ConnectionError: refused) failing",
        "not ready: db (recovering) failing",
        "ready",
    ]


@pytest.mark.asyncio
async def test_liveness_reports_a_stall_after_the_loop_recovers() -> None:
    reg = CheckRegistry()
    state = WorkerState(registry=reg, phase=Phase.READY, ready_at=time.monotonic())
    config = HealthConfig(loop_stall=0.1, stall_hold=60)
    monitor = CheckMonitor(state, reg, config, Notifier(environ={}))
    monitor.start()
    loop = asyncio.get_running_loop()
    try:
        assert health.overall(health.liveness(state, config)) == "pass"
        time.sleep(0.3)  # noqa: ASYNC251 - the fault under test: a blocked event loop
        # the probe runs late too: the stall shows even before the next tick
        entries = health.liveness(state, config)
        assert entries[0].status == "fail"
        assert entries[0].output.startswith("event loop stalled for 0.")
        # a timer due now runs after the overdue heartbeat tick (timers run in due order)
        ticked = asyncio.Event()
        loop.call_at(loop.time(), ticked.set)
        await ticked.wait()
        assert state.loop.stall is not None
        assert state.loop.stall[1] >= 0.3
        entries = health.liveness(state, config)
        assert entries[0].status == "fail"
        assert "ago" in entries[0].output
    finally:
        await monitor.stop()
        monitor.close()


@pytest.mark.asyncio
async def test_a_broken_monitor_fails_liveness(monkeypatch: pytest.MonkeyPatch) -> None:
    reg = CheckRegistry()

    async def fine() -> bool:
        return True

    reg.add(Check("db", fine, interval=0.01))
    state = WorkerState(registry=reg, phase=Phase.READY, ready_at=time.monotonic())
    monitor = CheckMonitor(state, reg, HealthConfig(), Notifier(environ={}))
    broke = asyncio.Event()

    def apply(check: Check, res: CheckResult) -> None:  # the injected fault
        broke.set()
        raise KeyError("a bug in the monitor")

    monkeypatch.setattr(monitor, "apply", apply)
    monitor.start()
    try:
        await asyncio.wait_for(broke.wait(), 10)
        # the monitor's own done-callback runs before asyncio.wait's: the error is recorded
        await asyncio.wait(monitor.tasks, timeout=10)
        entries = health.liveness(state, HealthConfig())
        assert entries[1].name == "monitor"
        assert entries[1].status == "fail"
        assert "KeyError" in entries[1].output
    finally:
        await monitor.stop()
        monitor.close()
