"""The demo application: ``sdserve run sdserve.demo:create_app``.

- ``GET /``: a fast 200.
- ``GET /slow?ms=N``: answers after N ms (at most 60 s).
- ``GET /block?ms=N``: blocks the event loop for N ms (at most 60 s), to show the watchdog;
  only with ``DEMO_ALLOW_BLOCK=1``, since anyone who reaches it can stall the service.
- ``GET /ws``: a WebSocket that echoes.
- ``GET /events``: server-sent events, a tick a second, until the drain begins: then a
  ``goodbye`` event, and the stream ends (so a drain never waits for it).

For the test bed, readiness can be tied to something a test controls:
``DEMO_WAIT_TCP=HOST:PORT`` adds a critical check that connects there, and
``DEMO_WAIT_FILE=PATH`` one that the file exists, and ``DEMO_WARMUP=SECONDS`` a warm-up step
that takes that long (a slow start, for reload tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

from aiohttp import WSMsgType, web

from .checks import add_check, add_warmup
from .drain import draining

MAX_MS = 60_000


def _ms(request: web.Request) -> float:
    try:
        ms = int(request.query.get("ms", "100"))
    except ValueError:
        raise web.HTTPBadRequest(text="ms must be a whole number\n") from None
    if not 0 <= ms <= MAX_MS:
        raise web.HTTPBadRequest(text=f"ms must be between 0 and {MAX_MS}\n")
    return ms / 1000


async def index(request: web.Request) -> web.Response:
    return web.Response(text=f"hello from sdserve demo (pid {os.getpid()})\n")


async def slow(request: web.Request) -> web.Response:
    delay = _ms(request)
    await asyncio.sleep(delay)
    return web.Response(text=f"slept {delay * 1000:.0f} ms\n")


async def block(request: web.Request) -> web.Response:
    delay = _ms(request)
    time.sleep(delay)  # noqa: ASYNC251 - deliberately blocks the event loop
    return web.Response(text=f"blocked the loop for {delay * 1000:.0f} ms\n")


async def echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=30)
    await ws.prepare(request)
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
    except ConnectionResetError:
        pass  # the connection is closing (the client left, or the server is going away)
    return ws


async def events(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    drain = draining(request)
    tick = 0
    try:
        while not drain.is_set():
            await response.write(f"id: {tick}\ndata: tick {tick}\n\n".encode())
            tick += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(drain.wait(), 1.0)  # the stream's own pace
        await response.write(b"event: goodbye\ndata: the server is restarting, reconnect\n\n")
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client left
    return response


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/slow", slow)
    if os.environ.get("DEMO_ALLOW_BLOCK") == "1":
        app.router.add_get("/block", block)
    app.router.add_get("/ws", echo)
    app.router.add_get("/events", events)
    if target := os.environ.get("DEMO_WAIT_TCP"):
        host, _, port = target.rpartition(":")

        async def tcp_check() -> str:
            _reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
            writer.close()
            await writer.wait_closed()
            return f"connected to {target}"

        add_check(app, "upstream", tcp_check, timeout=2.0)
    if seconds := os.environ.get("DEMO_WARMUP"):

        async def warm() -> None:
            await asyncio.sleep(float(seconds))  # the slow warm-up itself

        add_warmup(app, "warm", warm, timeout=float(seconds) + 10)
    if path := os.environ.get("DEMO_WAIT_FILE"):

        async def file_check() -> bool:
            return os.path.exists(path)  # noqa: ASYNC240 - one stat, no I/O wait

        add_check(app, "flag-file", file_check, timeout=1.0)
    return app
