"""An application whose timing the tests control, through a gate and a flag file.

- ``GET /``: a fast 200.
- ``GET /hold/NAME``: tells the test's gate (``TESTAPP_GATE``, a unix socket) that
  it has started, then answers once the gate releases it.
- ``GET /block/NAME?s=SECONDS``: tells the gate ``block-NAME`` (with its PID), then blocks the
  event loop (a stuck worker, for the watchdog).
- ``GET /nodelay``: whether TCP_NODELAY is set on this connection's socket.
- ``GET /ws``: a WebSocket that echoes.
- ``GET /events``: server-sent events, ended from ``on_shutdown`` with a goodbye event, the
  way aiohttp's documentation ends streams (no sdserve API).
- ``GET /file``: ``TESTAPP_FILE`` as a ``FileResponse``.
- ``TESTAPP_SHUTDOWN_GATE=1``: an ``on_shutdown`` hook tells the gate ``on-shutdown``.
- ``TESTAPP_READY_FILE``: a critical check that passes once the file exists.
- ``TESTAPP_HOOKS_LOG``: a drain hook, on_shutdown / on_cleanup hooks and released
  ``/hold`` requests append their names to it.
- ``TESTAPP_SLOW_FACTORY=SECONDS``: the factory blocks that long (a slow import).
- ``TESTAPP_WARMUP=SECONDS``: a warm-up step that takes that long.
- ``TESTAPP_STARTUP_RAISES=1``: the second on_startup hook raises.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

from aiohttp import WSMsgType, web

from sdserve import add_check, add_drain_hook, add_warmup, draining
from tests.apps.streams import add_events


async def index(request: web.Request) -> web.Response:
    return web.Response(text=f"ok {os.getpid()}\n")


async def hold(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    reader, writer = await asyncio.open_unix_connection(os.environ["TESTAPP_GATE"])
    try:
        writer.write(f"{name}\n".encode())
        await writer.drain()
        await reader.read(1)
    finally:
        writer.close()
    if hooks := os.environ.get("TESTAPP_HOOKS_LOG"):
        with open(hooks, "a") as fh:  # noqa: ASYNC230 - one short line
            fh.write(f"request-{name}\n")
    return web.Response(text=f"released {name}\n")


async def block(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    _reader, writer = await asyncio.open_unix_connection(os.environ["TESTAPP_GATE"])
    writer.write(f"block-{name}\n".encode())
    await writer.drain()
    time.sleep(float(request.query.get("s", "10")))  # noqa: ASYNC251 - the stuck loop itself
    writer.close()
    return web.Response(text=f"unblocked {name}\n")


async def nodelay(request: web.Request) -> web.Response:
    transport = request.transport
    assert transport is not None
    sock = transport.get_extra_info("socket")
    value = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    return web.Response(text=f"{value}\n")


async def echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(msg.data)
    return ws


async def file(request: web.Request) -> web.FileResponse:
    return web.FileResponse(os.environ["TESTAPP_FILE"])


async def tell_gate(app: web.Application) -> None:
    _reader, writer = await asyncio.open_unix_connection(os.environ["TESTAPP_GATE"])
    writer.write(b"on-shutdown\n")
    await writer.drain()
    writer.close()


def _hook(log: Path, name: str) -> object:
    async def hook(app: web.Application) -> None:
        with log.open("a") as fh:
            fh.write(f"{name}\n")

    return hook


async def _opened(app: web.Application) -> None:
    pass


async def _raises(app: web.Application) -> None:
    raise RuntimeError("the database said no")


def create_app() -> web.Application:
    if delay := os.environ.get("TESTAPP_SLOW_FACTORY"):
        time.sleep(float(delay))  # a slow import: blocks the loop, as imports do
    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/hold/{name}", hold)
    app.router.add_get("/block/{name}", block)
    app.router.add_get("/nodelay", nodelay)
    app.router.add_get("/ws", echo)
    add_events(app)
    app.router.add_get("/file", file)
    if os.environ.get("TESTAPP_SHUTDOWN_GATE") == "1":
        app.on_shutdown.append(tell_gate)
    if flag := os.environ.get("TESTAPP_READY_FILE"):

        async def flag_file() -> bool:
            return os.path.exists(flag)  # noqa: ASYNC240 - one stat

        add_check(app, "flag-file", flag_file, timeout=1.0)
    if seconds := os.environ.get("TESTAPP_WARMUP"):

        async def warm() -> None:
            await asyncio.sleep(float(seconds))  # the slow warm-up being tested

        add_warmup(app, "warm", warm, timeout=60)
    if os.environ.get("TESTAPP_STARTUP_RAISES") == "1":
        app.on_startup.append(_opened)
        app.on_startup.append(_raises)
    if hooks := os.environ.get("TESTAPP_HOOKS_LOG"):
        log = Path(hooks)

        async def drain_hook(app: web.Application) -> None:
            with log.open("a") as fh:  # noqa: ASYNC230 - one short line
                fh.write("drain-hook-after-event\n" if draining(app).is_set() else "drain-hook\n")

        add_drain_hook(app, drain_hook)
        for i in (1, 2, 3):
            app.on_shutdown.append(_hook(log, f"shutdown-{i}"))  # type: ignore[arg-type]
            app.on_cleanup.append(_hook(log, f"cleanup-{i}"))  # type: ignore[arg-type]
    return app
