"""Built-in checks and the runner against real services and real sockets."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from sdserve import builtin_checks as bc
from sdserve.checks import Check, CheckFunc, CheckRegistry, run_bounded, run_check

SHARED_PG = "postgresql://postgres@127.0.0.1:5432/test"


async def run(
    func: CheckFunc, timeout: float = 5.0, reg: CheckRegistry | None = None
) -> tuple[bool, str]:
    result = await run_check(Check("c", func, timeout), reg)
    return result.ok, result.output


@pytest.mark.asyncio
async def test_postgres_passes_on_the_shared_server_and_leaves_no_connection() -> None:
    ok, output = await run(bc.postgres(SHARED_PG, application_name="sdserve-test-pg"))
    assert ok, output
    assert output.startswith("PostgreSQL ")
    conn = await asyncpg.connect(SHARED_PG)
    try:
        left = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'sdserve-test-pg'"
        )
    finally:
        await conn.close()
    assert left == 0


@pytest.mark.asyncio
async def test_postgres_fails_when_refused_or_query_fails(closed_port: int) -> None:
    ok, output = await run(bc.postgres(f"postgresql://postgres@127.0.0.1:{closed_port}/test"))
    assert not ok
    assert "Connect" in output or "refused" in output.lower()
    ok, output = await run(bc.postgres(SHARED_PG, query="SELECT no_such_column"))
    assert not ok
    assert "no_such_column" in output


@pytest.mark.asyncio
async def test_postgres_pool_and_redis_client_of_the_application() -> None:
    pool = await asyncpg.create_pool(SHARED_PG, min_size=1, max_size=1)
    try:
        ok, output = await run(bc.postgres_pool(pool))
        assert ok, output
    finally:
        await pool.close()
    client = Redis(host="127.0.0.1", port=6379)
    try:
        assert await run(bc.redis_client(client)) == (True, "PONG")
    finally:
        await client.aclose()


@pytest.mark.asyncio
async def test_redis_passes_on_the_shared_server_and_fails_when_refused(
    closed_port: int,
) -> None:
    assert await run(bc.redis("redis://127.0.0.1:6379/0")) == (True, "PONG")
    ok, output = await run(bc.redis(f"redis://127.0.0.1:{closed_port}/0"))
    assert not ok
    assert "ConnectionError" in output


@pytest.mark.asyncio
async def test_tcp(closed_port: int) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    try:
        port = server.getsockname()[1]
        assert await run(bc.tcp("127.0.0.1", port)) == (True, f"connected to 127.0.0.1:{port}")
    finally:
        server.close()
    ok, output = await run(bc.tcp("127.0.0.1", closed_port))
    assert not ok
    assert "Connect call failed" in output or "refused" in output.lower()


@pytest_asyncio.fixture
async def web_server() -> AsyncIterator[TestServer]:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="status: all good")

    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=500, text="oops")

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/ok")

    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/broken", broken)
    app.router.add_get("/moved", moved)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


@pytest.mark.asyncio
async def test_http_status_and_body_match(web_server: TestServer) -> None:
    base = f"http://127.0.0.1:{web_server.port}"
    assert await run(bc.http(f"{base}/ok")) == (True, "HTTP 200")
    assert await run(bc.http(f"{base}/ok", body=r"all\s+good")) == (True, "HTTP 200")
    ok, output = await run(bc.http(f"{base}/ok", body="^degraded"))
    assert (ok, output) == (False, "HTTP 200, body does not match '^degraded'")
    assert await run(bc.http(f"{base}/broken")) == (False, "HTTP 500, expected 200")
    assert await run(bc.http(f"{base}/broken", status=(200, 500))) == (True, "HTTP 500")
    # redirects are not followed: a 302 is what the service answered
    assert await run(bc.http(f"{base}/moved")) == (False, "HTTP 302, expected 200")


@pytest.mark.asyncio
async def test_dns_resolves_localhost() -> None:
    ok, output = await run(bc.dns("localhost", family="ipv4"))
    assert (ok, output) == (True, "127.0.0.1")


@pytest.mark.asyncio
async def test_disk_and_file(tmp_path: Path) -> None:
    ok, output = await run(bc.disk(str(tmp_path), min_free=1))
    assert ok, output
    assert "free" in output
    ok, output = await run(bc.disk(str(tmp_path), min_free=2**50))
    assert not ok
    assert "below 1024.0 TiB" in output
    flag = tmp_path / "flag"
    assert await run(bc.file_exists(str(flag))) == (False, f"{flag} does not exist")
    flag.touch()
    assert await run(bc.file_exists(str(flag))) == (True, f"{flag} exists")


def test_url_secrets_finds_userinfo_and_query_passwords() -> None:
    assert bc.url_secrets("postgresql://u:p%40ss@h/db") == {"p@ss", "p%40ss"}
    assert bc.url_secrets("redis://h:6379/0?password=xyz") == {"xyz"}
    assert bc.url_secrets("postgresql://u@h/db") == set()


# -- the runner ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_run_that_ignores_cancellation_is_abandoned_at_its_timeout() -> None:
    release = asyncio.Event()
    cancel_seen = asyncio.Event()
    started = 0
    ignored = 0

    async def stubborn() -> str:
        nonlocal started, ignored
        started += 1
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                ignored += 1
                cancel_seen.set()
        return "done"

    reg = CheckRegistry()
    check = Check("stubborn", stubborn, timeout=0.2)
    try:
        await _abandon_and_block(check, reg, cancel_seen, lambda: (started, ignored))
    finally:
        release.set()  # never leave a task behind that ignores cancellation
    task = reg.hanging.get("stubborn")
    if task is not None:
        await asyncio.wait({task}, timeout=5)
    assert reg.hanging == {}
    assert reg.abandoned == set()
    third = await run_check(check, reg)
    assert (third.ok, third.output, started) == (True, "done", 2)


async def _abandon_and_block(
    check: Check,
    reg: CheckRegistry,
    cancel_seen: asyncio.Event,
    seen: Callable[[], tuple[int, int]],
) -> None:
    began = time.monotonic()
    first = await run_check(check, reg)
    took = time.monotonic() - began
    assert not first.ok
    assert first.output == "timed out after 0.2s"
    assert took < 0.2 + 0.15
    # only one run in flight: the next one fails at once without starting the check
    second = await run_check(check, reg)
    assert second.output == "the previous run is still running (it ignored cancellation)"
    assert "stubborn" in reg.hanging
    await asyncio.wait_for(cancel_seen.wait(), 5)
    assert seen() == (1, 1)


@pytest.mark.asyncio
async def test_raising_checks_fail_with_the_exception_and_secrets_are_redacted() -> None:
    reg = CheckRegistry(secrets={"hunter2"})

    async def raises() -> None:
        raise RuntimeError("login with hunter2 refused")

    def not_async() -> CheckFunc:
        raise ValueError("built wrong")

    async def says_no() -> bool:
        return False

    result = await run_check(Check("r", raises), reg)
    assert (result.ok, result.output) == (False, "RuntimeError: login with *** refused")
    result = await run_check(Check("s", not_async), reg)  # type: ignore[arg-type]
    assert (result.ok, result.output) == (False, "ValueError: built wrong")
    result = await run_check(Check("n", says_no), reg)
    assert (result.ok, result.output) == (False, "returned False")


def test_run_bounded_does_not_wait_forever_for_a_task_that_ignores_cancellation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    left: list[asyncio.Task[None]] = []

    async def stubborn() -> None:
        for _ in range(3):  # ignores the first three cancellations, then gives in
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                continue

    async def main() -> str:
        left.append(asyncio.create_task(stubborn(), name="stubborn"))
        await asyncio.sleep(0)  # let it start
        return "main done"

    began = time.monotonic()
    assert run_bounded(main(), grace=0.2) == "main done"
    assert time.monotonic() - began < 0.2 + 0.5
    assert "1 task(s) ignored cancellation for 0.2s and are left behind: stubborn" in caplog.text
    assert not left[0].done()
    # give in: the loop is closed, so close the coroutine by hand (no warning left behind)
    left[0].get_coro().close()
