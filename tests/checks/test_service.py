"""The real daemon (``sdserve run`` under the launcher) with real dependencies.

PostgreSQL is the shared instance, behind a proxy the test takes down for
outages; Redis outages use a private redis-server the test starts and kills.
Synchronisation is on notify messages (STATUS= follows readiness) and on
process output; timeouts are upper bounds only.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from typing import Any

import aiohttp
import asyncpg
import pytest

from .conftest import ServiceFactory
from .helpers import RedisServer, Service, TcpProxy

SHARED_PG = "postgresql://postgres@127.0.0.1:5432/test"
SHARED_REDIS = "redis://127.0.0.1:6379/0"


def config(
    *,
    workers: int = 0,
    interval: float = 0.2,
    fail_threshold: int = 2,
    pass_threshold: int = 1,
    checks: str = "",
    extra: str = "",
    health: str = "",
) -> str:
    return f"""
workers = {workers}
retry_initial = 0.05
retry_max = 0.25
start_timeout = 60
{extra}

[health]
interval = {interval}
fail_threshold = {fail_threshold}
pass_threshold = {pass_threshold}
{health}
{checks}
"""


def redis_table(url: str, name: str = "cache") -> str:
    return f'\n[checks.{name}]\ntype = "redis"\nurl = "{url}"\ntimeout = 1\n'


def pg_table(dsn: str, name: str = "db", extra: str = "") -> str:
    return f'\n[checks.{name}]\ntype = "postgres"\ndsn = "{dsn}"\ntimeout = 2\n{extra}\n'


async def get(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, str, float]:
    """Status, body and latency of one GET."""
    began = time.monotonic()
    async with session.get(url, **kwargs) as resp:
        body = await resp.text()
        return resp.status, body, time.monotonic() - began


# -- start-up --------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "supervised"])
async def test_redis_down_at_start_then_ready_within_one_interval(
    service_factory: ServiceFactory, private_redis: RedisServer, workers: int
) -> None:
    svc = service_factory(config(workers=workers, checks=redis_table(private_redis.url)))
    instance = await svc.launcher.spawn()
    waiting = await svc.expect_status("waiting for cache", timeout=30)
    assert "ConnectionError" in waiting.fields["STATUS"]
    await svc.expect(lambda m: "EXTEND_TIMEOUT_USEC" in m.fields, timeout=10)
    assert not any(m.has("READY", "1") for m in svc.messages)
    assert instance.exited.done() is False

    up = await private_redis.start()
    ready = await svc.expect(lambda m: m.has("READY", "1"), timeout=10)
    delay = ready.received - up
    print(f"\nredis up -> READY=1 ({workers} workers): {delay * 1000:.0f} ms (retry_max 250 ms)")
    # the retry pause at start is capped by retry_max; one run takes milliseconds
    assert delay <= 0.25 + 1.0
    async with aiohttp.ClientSession() as session:
        status, body, _ = await get(session, svc.url("/readyz?verbose", admin=True))
    assert status == 200, body
    assert "[+]cache ok" in body


@pytest.mark.asyncio
async def test_warm_up_runs_after_the_checks_and_before_ready(
    service_factory: ServiceFactory,
) -> None:
    svc = service_factory(config(), env={"CHECKS_APP_CHECKS": "counted,warmup"})
    await svc.launcher.spawn()
    warming = await svc.expect_status("warming up: fill-cache", timeout=30)
    ready = await svc.expect(lambda m: m.has("READY", "1"), timeout=30)
    assert svc.messages.index(warming) < svc.messages.index(ready)
    async with aiohttp.ClientSession() as session:
        _, body, _ = await get(session, svc.url("/_counts"))
    runs = json.loads(body)["runs"]
    assert runs["warmed"] == 1
    assert runs["counted"] >= 1
    assert await svc.launcher.stop() == 0  # its log is all written once it exited
    assert "check fill-cache passed" in svc.log_text()


@pytest.mark.asyncio
async def test_postgres_down_at_start_then_ready(
    service_factory: ServiceFactory, pg_proxy: TcpProxy
) -> None:
    pg_proxy.down()
    dsn = f"postgresql://postgres@127.0.0.1:{pg_proxy.port}/test"
    svc = service_factory(config(checks=pg_table(dsn)))
    await svc.launcher.spawn()
    await svc.expect_status("waiting for db", timeout=30)
    await svc.expect(lambda m: "EXTEND_TIMEOUT_USEC" in m.fields, timeout=10)
    assert not any(m.has("READY", "1") for m in svc.messages)
    up = time.monotonic()
    pg_proxy.set_up()
    ready = await svc.expect(lambda m: m.has("READY", "1"), timeout=10)
    delay = ready.received - up
    print(f"\npostgres up -> READY=1: {delay * 1000:.0f} ms")
    assert delay <= 0.25 + 2.0


# -- run time --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_outage_at_run_time_readyz_503_livez_200_and_recovery(
    service_factory: ServiceFactory, private_redis: RedisServer, pg_proxy: TcpProxy
) -> None:
    await private_redis.start()
    dsn = f"postgresql://postgres@127.0.0.1:{pg_proxy.port}/test"
    interval, threshold = 0.2, 2
    svc = service_factory(
        config(
            interval=interval,
            fail_threshold=threshold,
            pass_threshold=2,
            checks=redis_table(private_redis.url) + pg_table(dsn),
        )
    )
    await svc.launcher.start(timeout=30)
    # a failing check needs `threshold` runs to take readiness: at most threshold
    # intervals, plus one interval of phase, plus the run itself (timeout 1 s / 2 s)
    limit = (threshold + 1) * interval + 2.0
    async with aiohttp.ClientSession() as session:
        for name, take_down, bring_up in (
            ("cache", private_redis.kill, private_redis.start),
            ("db", _sync(pg_proxy.down), _sync(pg_proxy.set_up)),
        ):
            mark = len(svc.messages)
            gone = await take_down()
            unready = await svc.expect_status("not ready", prefix=True, timeout=10, start=mark)
            assert name in unready.fields["STATUS"]
            took = unready.received - gone
            status, body, _ = await get(session, svc.url("/readyz?verbose", admin=True))
            assert status == 503, body
            assert f"[-]{name} failed" in body
            status, body, _ = await get(session, svc.url("/livez"))
            assert (status, body) == (200, "ok\n")
            status, body, _ = await get(session, svc.url("/readyz"))
            assert status == 503
            assert f"[-]{name} failed: reason withheld" in body

            mark = len(svc.messages)
            back = await bring_up()
            ready = await svc.expect_status("ready", prefix=True, timeout=10, start=mark)
            assert ready.fields["STATUS"] == "ready"
            recovered = ready.received - back
            print(
                f"\n{name}: down -> not ready {took * 1000:.0f} ms (limit {limit:.1f} s); "
                f"back -> ready {recovered * 1000:.0f} ms (pass_threshold 2, interval {interval} s)"
            )
            assert took <= limit
            assert recovered <= 3 * interval + 2.0
            for path in ("/readyz", "/livez"):
                status, body, _ = await get(session, svc.url(path))
                assert (status, body) == (200, "ok\n")
    assert await svc.launcher.stop() == 0


def _sync(fn: Any) -> Any:
    async def call() -> float:
        fn()
        return time.monotonic()

    return call


@pytest.mark.asyncio
async def test_hanging_check_ignoring_cancellation_never_holds_a_probe(
    service_factory: ServiceFactory,
) -> None:
    svc = service_factory(
        config(interval=0.1, fail_threshold=2),
        env={"CHECKS_APP_CHECKS": "hang"},
    )
    await svc.launcher.start(timeout=30)
    timeout = 0.5  # the check's timeout (tests/checks/apps.py)
    async with aiohttp.ClientSession() as session:
        mark = len(svc.messages)
        svc.flag("hang")
        unready = asyncio.ensure_future(
            svc.expect_status("not ready: hang", timeout=10, start=mark)
        )
        latencies: list[float] = []
        for _ in range(2000):  # probe all along until readiness turns
            status, _body, took = await get(session, svc.url("/readyz"))
            latencies.append(took)
            if unready.done():
                break
        await unready
        assert max(latencies) < timeout, max(latencies)
        status, body, took = await get(session, svc.url("/readyz?verbose", admin=True))
        assert took < timeout
        assert status == 503
        assert "[-]hang failed:" in body
        assert "still running" in body or "timed out after 0.5s" in body
        status, counts, _ = await get(session, svc.url("/_counts"))
        runs = json.loads(counts)["runs"]
        # one run in flight at a time: the hanging run blocks new ones
        assert runs["hang_started"] == 1
        assert runs["hang_ignored"] >= 1
        status, body, _ = await get(session, svc.url("/livez"))
        assert status == 200

        svc.flag("hang", on=False)
        mark = len(svc.messages)
        async with session.post(svc.url("/_release")) as resp:
            assert resp.status == 200
        await svc.expect_status("ready", prefix=True, timeout=10, start=mark)
        status, body, _ = await get(session, svc.url("/readyz"))
        assert status == 200
    print(f"\nprobe latency while a check hung: max {max(latencies) * 1000:.1f} ms")
    assert await svc.launcher.stop() == 0


@pytest.mark.asyncio
async def test_raising_check_is_reported_failed_and_the_process_carries_on(
    service_factory: ServiceFactory,
) -> None:
    svc = service_factory(config(interval=0.1), env={"CHECKS_APP_CHECKS": "boom,counted"})
    instance = await svc.launcher.start(timeout=30)
    async with aiohttp.ClientSession() as session:
        mark = len(svc.messages)
        svc.flag("boom")
        msg = await svc.expect_status("not ready: boom", timeout=10, start=mark)
        assert "RuntimeError: boom" in msg.fields["STATUS"]
        status, body, _ = await get(session, svc.url("/readyz?format=json", admin=True))
        assert status == 503
        doc = json.loads(body)
        assert doc["status"] == "fail"
        entry = doc["checks"]["boom:responseTime"][0]
        assert entry["status"] == "fail"
        assert entry["output"].startswith("RuntimeError: boom")
        assert doc["checks"]["counted:responseTime"][0]["status"] == "pass"
        # the process carries on: same pid, serves, live, and other checks keep running
        status, body, _ = await get(session, svc.url("/"))
        assert (status, body) == (200, "hello\n")
        status, _, _ = await get(session, svc.url("/livez"))
        assert status == 200
        # ?exclude=boom leaves the failing check out
        status, body, _ = await get(session, svc.url("/readyz?exclude=boom&verbose"))
        assert status == 200, body
        assert "[+]boom excluded: ok" in body
        svc.flag("boom", on=False)
        mark = len(svc.messages)
        await svc.expect_status("ready", prefix=True, timeout=10, start=mark)
    assert instance.exited.done() is False
    assert await svc.launcher.stop() == 0


@pytest.mark.asyncio
async def test_readyz_503_from_the_first_moment_of_a_drain(
    service_factory: ServiceFactory,
) -> None:
    svc = service_factory(
        config(extra="drain_delay = 5", health="loop_stall = 0.3"),
        env={"CHECKS_APP_CHECKS": "counted"},
    )
    await svc.launcher.start(timeout=30)
    async with aiohttp.ClientSession() as session:
        status, _, _ = await get(session, svc.url("/readyz"))
        assert status == 200
        mark = len(svc.messages)
        svc.launcher.send_signal(15)
        await svc.expect(lambda m: m.has("STOPPING", "1"), timeout=10, start=mark)
        status, body, _ = await get(session, svc.url("/readyz?verbose", admin=True))
        assert status == 503
        assert "[-]phase failed: draining" in body
        # liveness holds through the drain, for several times loop_stall (the heartbeat
        # goes on after the check monitor stopped)
        began = time.monotonic()
        probes = 0
        while time.monotonic() - began < 1.2 and probes < 10_000:
            status, body, _ = await get(session, svc.url("/livez?verbose", admin=True))
            assert status == 200, body
            probes += 1
        status, body, _ = await get(session, svc.url("/readyz"))
        assert status == 503
    assert await svc.launcher.stop() == 0


@pytest.mark.asyncio
async def test_loop_stall_fails_livez_after_recovery_not_readyz(
    service_factory: ServiceFactory,
) -> None:
    svc = service_factory(
        config(health="loop_stall = 0.5\nstall_hold = 30"), env={"CHECKS_APP_CHECKS": "counted"}
    )
    await svc.launcher.start(timeout=30)
    async with aiohttp.ClientSession() as session:
        status, _, _ = await get(session, svc.url("/livez"))
        assert status == 200
        status, body, _ = await get(session, svc.url("/_block?ms=1500"))
        assert status == 200
        status, body, _ = await get(session, svc.url("/livez?verbose", admin=True))
        assert status == 503, body
        assert "[-]loop failed: event loop stalled for 1." in body
        status, body, _ = await get(session, svc.url("/livez?format=json", admin=True))
        entry = json.loads(body)["checks"]["loop:lag"][0]
        assert entry["status"] == "fail"
        assert entry["observedValue"] >= 1000
        status, _, _ = await get(session, svc.url("/readyz"))
        assert status == 200
    assert await svc.launcher.stop() == 0
    # read once the process exited: its log writer thread writes in batches, and has
    # written everything by then
    assert "the event loop was stalled for 1." in svc.log_text()


# -- load ------------------------------------------------------------------------------------


async def _raw_probe(
    port: int, path: str, *, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
) -> tuple[int, float]:
    """One probe on a raw socket (the client's own overhead kept small): status and latency.

    Without ``conn`` it connects first (the latency includes the connect), as kubelet does.
    """
    began = time.monotonic()
    reader, writer = conn if conn is not None else await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()  # the server closes after the response
    took = time.monotonic() - began
    writer.close()
    await writer.wait_closed()
    return int(data.split(b" ", 2)[1]), took


def _percentiles(latencies: list[float]) -> tuple[float, float]:
    lat = sorted(latencies)
    return statistics.median(lat) * 1000, lat[max(0, int(len(lat) * 0.99) - 1)] * 1000


@pytest.mark.asyncio
async def test_probe_storm_1000_concurrent_probes_run_no_check(
    service_factory: ServiceFactory,
) -> None:
    interval = 3.0
    svc = service_factory(
        config(interval=interval, checks=pg_table(SHARED_PG) + redis_table(SHARED_REDIS)),
        env={"CHECKS_APP_CHECKS": "counted"},
    )
    await svc.launcher.start(timeout=30)
    async with aiohttp.ClientSession() as control:
        _, before, _ = await get(control, svc.url("/_counts"))
        _, health_before, _ = await get(control, svc.url("/readyz?format=json", admin=True))
        # storm 1: 1,000 probes at once, each on a new connection
        began = time.monotonic()
        fresh = await asyncio.gather(*(_raw_probe(svc.port, "/readyz") for _ in range(1000)))
        took_fresh = time.monotonic() - began
        # storm 2: 1,000 connections open first, then 1,000 probes sent at once
        began = time.monotonic()
        conns = await asyncio.gather(
            *(asyncio.open_connection("127.0.0.1", svc.port) for _ in range(1000))
        )
        took_connect = time.monotonic() - began
        began = time.monotonic()
        held = await asyncio.gather(*(_raw_probe(svc.port, "/readyz", conn=c) for c in conns))
        took_held = time.monotonic() - began
        _, after, _ = await get(control, svc.url("/_counts"))
        _, health_after, _ = await get(control, svc.url("/readyz?format=json", admin=True))
    assert all(status == 200 for status, _ in fresh + held)
    took = took_fresh + took_held
    runs = json.loads(after)["runs"]["counted"] - json.loads(before)["runs"]["counted"]
    # probes never run a check: at most the scheduled runs of the storm's duration
    allowed = int(took // interval) + 1
    assert runs <= allowed, (runs, took)
    checks_before = json.loads(health_before)["checks"]
    checks_after = json.loads(health_after)["checks"]
    for key in ("db:responseTime", "cache:responseTime"):
        assert checks_after[key][0]["status"] == "pass"
        changed = checks_after[key][0]["time"] != checks_before[key][0]["time"]
        assert int(changed) <= allowed
    p50f, p99f = _percentiles([t for _, t in fresh])
    p50h, p99h = _percentiles([t for _, t in held])
    print(
        f"\nstorm of 1000 concurrent /readyz, new connections: {took_fresh * 1000:.0f} ms in all, "
        f"p50 {p50f:.1f} ms, p99 {p99f:.1f} ms (connect included)"
        f"\nstorm of 1000 concurrent /readyz, connections open: {took_held * 1000:.0f} ms in all, "
        f"p50 {p50h:.1f} ms, p99 {p99h:.1f} ms (opening them took {took_connect * 1000:.0f} ms)"
        f"\n'counted' ran {runs} time(s) during both storms (interval {interval} s)"
    )


async def _pg_connections(application_name: str) -> int:
    conn = await asyncpg.connect(SHARED_PG)
    try:
        value = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", application_name
        )
        return int(value)
    finally:
        await conn.close()


PROBE_PATHS = (
    "/livez",
    "/readyz",
    "/startupz",
    "/readyz?verbose",
    "/readyz?format=json",
    "/livez?verbose&exclude=loop",
)


async def _counts(svc: Service) -> dict[str, Any]:
    """The server's own counts, asked on a fresh connection (closed after)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        _, body, _ = await get(session, svc.url("/_counts"))
    doc: dict[str, Any] = json.loads(body)
    return doc


async def _probe_load(svc: Service, total: int, *, keepalive: bool, clients: int = 25) -> None:
    """``total`` probes from ``clients`` concurrent clients, main and admin sockets, all paths."""

    async def client(session: aiohttp.ClientSession, n: int, start: int) -> None:
        for i in range(n):
            path = PROBE_PATHS[(start + i) % len(PROBE_PATHS)]
            status, _, _ = await get(session, svc.url(path, admin=bool(i % 2)))
            assert status == 200

    connector = aiohttp.TCPConnector(limit=0, force_close=not keepalive)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(session, total // clients, c) for c in range(clients)))


@pytest.mark.asyncio
async def test_no_leaks_after_10000_probes(service_factory: ServiceFactory) -> None:
    # checks ran at start; none runs meanwhile, so every count must come back exactly
    svc = service_factory(
        config(interval=3600, checks=pg_table(SHARED_PG) + redis_table(SHARED_REDIS)),
        env={"CHECKS_APP_CHECKS": "counted"},
    )
    await svc.launcher.start(timeout=30)
    await _probe_load(svc, 100, keepalive=True)  # warm up: imports, caches
    before = await _counts(svc)
    await _probe_load(svc, 5000, keepalive=True)
    await _probe_load(svc, 5000, keepalive=False)
    after = await _counts(svc)
    print(
        f"\n10,000 probes: tasks {before['tasks']} -> {after['tasks']}, "
        f"fds {before['fds']} -> {after['fds']}, sockets {before['sockets']} -> {after['sockets']}"
    )
    for key in ("tasks", "fds", "sockets"):
        assert after[key] == before[key], (key, before, after)
    assert after["runs"] == before["runs"]
    assert await svc.launcher.stop() == 0


@pytest.mark.asyncio
async def test_no_leaks_with_checks_running_meanwhile(service_factory: ServiceFactory) -> None:
    svc = service_factory(
        config(interval=0.05, checks=pg_table(SHARED_PG) + redis_table(SHARED_REDIS)),
        env={"CHECKS_APP_CHECKS": "counted"},
    )
    await svc.launcher.start(timeout=30)
    await _probe_load(svc, 100, keepalive=True)
    before = await _counts(svc)
    pg_before = await _pg_connections("sdserve-check:db")
    await _probe_load(svc, 5000, keepalive=True)
    await _probe_load(svc, 5000, keepalive=False)
    after = await _counts(svc)
    pg_after = await _pg_connections("sdserve-check:db")
    runs = after["runs"]["counted"] - before["runs"]["counted"]
    print(
        f"\n10,000 probes with checks every 50 ms ({runs} runs of each): tasks {before['tasks']} "
        f"-> {after['tasks']}, fds {before['fds']} -> {after['fds']}, sockets "
        f"{before['sockets']} -> {after['sockets']}, PostgreSQL connections of the db check "
        f"{pg_before} -> {pg_after}"
    )
    assert runs >= 20
    # a run may be in flight at either count: db and cache hold a socket (and a task) each,
    # counted a task; so at most that much difference, however many runs there were
    assert after["tasks"] <= before["tasks"] + 3
    assert after["fds"] <= before["fds"] + 2
    assert after["sockets"] <= before["sockets"] + 2
    assert pg_after <= 1
    assert await svc.launcher.stop() == 0


# -- secrets ---------------------------------------------------------------------------------

PASSWORD = "Tr0ub4dor&3-s3cr3t"


@pytest.mark.asyncio
async def test_password_appears_in_no_output_log_or_status(
    service_factory: ServiceFactory, tmp_path: Any
) -> None:
    from urllib.parse import quote

    leaky_dsn = f"postgresql://postgres:{quote(PASSWORD, safe='')}@127.0.0.1:5432/test"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "pg").write_text(PASSWORD + "\n")
    checks = pg_table(SHARED_PG, "db", 'password_env = "PG_TEST_PASSWORD"')
    checks += pg_table(SHARED_PG, "db2", 'password_credential = "pg"')
    svc = service_factory(
        config(interval=0.1, checks=checks),
        env={
            "CHECKS_APP_CHECKS": "leaky",
            "CHECKS_APP_DSN": leaky_dsn,
            "PG_TEST_PASSWORD": PASSWORD,
            "CREDENTIALS_DIRECTORY": str(creds),
        },
        log_level="debug",
    )
    svc.flag("leaky")
    await svc.launcher.spawn()
    waiting = await svc.expect_status("waiting for leaky", timeout=30)
    assert "could not connect to postgresql://postgres:***@127.0.0.1" in waiting.fields["STATUS"]
    svc.flag("leaky", on=False)
    await svc.expect(lambda m: m.has("READY", "1"), timeout=30)
    bodies: list[str] = []
    async with aiohttp.ClientSession() as session:
        for admin in (False, True):
            for path in ("/readyz?verbose", "/readyz?format=json", "/livez?verbose"):
                bodies.append((await get(session, svc.url(path, admin=admin)))[1])
        mark = len(svc.messages)
        svc.flag("leaky")
        await svc.expect_status("not ready: leaky", timeout=10, start=mark)
        for admin in (False, True):
            for path in ("/readyz", "/readyz?verbose", "/readyz?format=json", "/startupz"):
                bodies.append((await get(session, svc.url(path, admin=admin)))[1])
    assert await svc.launcher.stop() == 0
    statuses = [m.fields.get("STATUS", "") for m in svc.messages]
    log = svc.log_text()
    secret_forms = {PASSWORD, quote(PASSWORD, safe="")}
    for form in secret_forms:
        for body in bodies:
            assert form not in body
        for status in statuses:
            assert form not in status
        assert form not in log
    # the outputs really were there, redacted (not merely absent)
    assert any("postgres:***@127.0.0.1" in b for b in bodies)
    assert "postgres:***@127.0.0.1" in log
    assert any("[+]db2 ok" in b for b in bodies)
    assert os.environ.get("PG_TEST_PASSWORD") is None
