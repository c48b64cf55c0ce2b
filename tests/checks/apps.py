"""The application the checks tests serve: ``tests.checks.apps:factory``.

``CHECKS_APP_CHECKS`` (comma-separated) picks code-registered checks:

- ``counted``: passes, and counts its runs (``/_counts`` reports them);
- ``boom``: raises ``RuntimeError`` while the flag file ``boom`` exists;
- ``hang``: while the flag ``hang`` exists, a run hangs and ignores cancellation
  until ``POST /_release``; it counts the cancellations it ignored;
- ``leaky``: fails, while the flag ``leaky`` exists, with a message that contains
  the DSN of ``CHECKS_APP_DSN``, password included (as careless libraries do);
  the DSN's password is registered as a secret, so it must be redacted;
- ``pool``: a query on the asyncpg pool the app opens in ``on_startup``;
- ``warmup``: a warm-up step ``fill-cache`` (counted in ``/_counts`` as ``warmed``).

Flags are files in ``CHECKS_APP_FLAGS``, read by the check at each run.
``GET /_counts`` reports the process's tasks, fds and sockets, and the runs;
``GET /_block?ms=N`` blocks the event loop for N ms.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import asyncpg
from aiohttp import web

from sdserve.builtin_checks import postgres_pool, url_secrets
from sdserve.checks import add_check, add_warmup, registry

COUNTS = web.AppKey("counts", dict[str, int])
POOL = web.AppKey("pool", asyncpg.Pool)
SHARED_PG = "postgresql://postgres@127.0.0.1:5432/test"


def process_counts() -> dict[str, int]:
    fds = 0
    sockets = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:  # the fd of the listdir itself, closed by now
            continue
        fds += 1
        sockets += target.startswith("socket:")
    return {"fds": fds, "sockets": sockets, "tasks": len(asyncio.all_tasks())}


def factory() -> web.Application:
    app = web.Application()
    counts: dict[str, int] = {"counted": 0, "hang_started": 0, "hang_ignored": 0}
    app[COUNTS] = counts
    flags = Path(os.environ.get("CHECKS_APP_FLAGS", "/nonexistent"))
    wanted = {c for c in os.environ.get("CHECKS_APP_CHECKS", "").split(",") if c}
    release = asyncio.Event()

    def flag(name: str) -> bool:
        return (flags / name).exists()

    async def counted() -> str:
        counts["counted"] += 1
        return f"run {counts['counted']}"

    async def boom() -> str:
        if flag("boom"):
            raise RuntimeError("boom")
        return "no boom"

    async def hang() -> str:
        if not flag("hang"):
            return "not hanging"
        counts["hang_started"] += 1
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                counts["hang_ignored"] += 1  # deliberately ignores cancellation
        release.clear()
        return "released"

    dsn = os.environ.get("CHECKS_APP_DSN", "")

    async def leaky() -> str:
        if flag("leaky"):
            raise ConnectionError(f"could not connect to {dsn}")
        return f"connected to {dsn}"

    async def pool() -> str:
        # uses a resource the application opens in on_startup
        return await postgres_pool(app[POOL])()  # type: ignore[return-value]

    async def open_pool(app: web.Application) -> None:
        app[POOL] = await asyncpg.create_pool(SHARED_PG, min_size=1, max_size=2)

    async def close_pool(app: web.Application) -> None:
        await app[POOL].close()

    async def warm() -> str:
        counts["warmed"] = counts.get("warmed", 0) + 1
        return "cache loaded"

    if "warmup" in wanted:
        add_warmup(app, "fill-cache", warm)
        wanted.discard("warmup")

    if "pool" in wanted:
        app.on_startup.append(open_pool)
        app.on_cleanup.append(close_pool)

    available = {"counted": counted, "boom": boom, "hang": hang, "leaky": leaky, "pool": pool}
    for name in sorted(wanted):
        add_check(app, name, available[name], timeout=0.5)
    if "leaky" in wanted:
        registry(app).secrets |= url_secrets(dsn)

    async def get_counts(request: web.Request) -> web.Response:
        return web.json_response({**process_counts(), "runs": counts})

    async def post_release(request: web.Request) -> web.Response:
        release.set()
        return web.Response(text="released\n")

    async def get_block(request: web.Request) -> web.Response:
        ms = int(request.query.get("ms", "0"))
        time.sleep(ms / 1000)  # noqa: ASYNC251 - deliberately stalls the event loop
        return web.Response(text=f"blocked {ms} ms\n")

    app.router.add_get("/_counts", get_counts)
    app.router.add_get("/_block", get_block)
    app.router.add_post("/_release", post_release)
    app.router.add_get("/", hello)
    return app


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="hello\n")
