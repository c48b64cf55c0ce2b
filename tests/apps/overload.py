"""An application for the overload tests and the benchmark.

- ``GET /cpu?ms=N``: N ms of CPU work (a busy loop, no await), then 200.
- ``GET /io``: awaits a "dependency" that takes ``TESTAPP_IO_MS`` (2 ms); after
  ``TESTAPP_SLOW_AFTER`` calls it takes ``TESTAPP_SLOW_MS`` (200 ms), and after
  ``TESTAPP_FAST_AFTER`` more it is fast again. Each call records the worker's
  concurrency limit, requests in flight and queued, by its ordinal.
- ``GET /hold``: sends its status and headers, then waits until ``GET /release``; the
  client knows it is in flight once the headers came.
- ``GET /control/stats``: the calls by path, the records of ``/io`` and the admission
  controller's snapshot, as JSON (the tests mark ``/control`` critical).
"""

from __future__ import annotations

import asyncio
import os
import time

from aiohttp import web

from sdserve.drain import ADMISSION

CALLS = web.AppKey("calls", dict[str, int])
RELEASED = web.AppKey("released", asyncio.Event)
RECORDS = web.AppKey("records", list[tuple[int, int, int, int]])


async def cpu(request: web.Request) -> web.Response:
    request.app[CALLS]["/cpu"] += 1
    end = time.perf_counter() + float(request.query.get("ms", "1")) / 1000
    while time.perf_counter() < end:
        pass
    return web.Response(text="done\n")


async def io(request: web.Request) -> web.Response:
    calls = request.app[CALLS]
    calls["/io"] += 1
    n = calls["/io"]
    slow_after = int(os.environ.get("TESTAPP_SLOW_AFTER", "0")) or None
    fast_after = int(os.environ.get("TESTAPP_FAST_AFTER", "0"))
    ms = float(os.environ.get("TESTAPP_IO_MS", "2"))
    if slow_after is not None and slow_after < n <= slow_after + fast_after:
        ms = float(os.environ.get("TESTAPP_SLOW_MS", "200"))
    adm = request.app.get(ADMISSION)
    if adm is not None:
        request.app[RECORDS].append((n, adm.limit, adm.inflight, adm.queue_length))
    await asyncio.sleep(ms / 1000)
    return web.Response(text="done\n")


async def hold(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    await response.prepare(request)
    await request.app[RELEASED].wait()
    await response.write(b"released\n")
    return response


async def release(request: web.Request) -> web.Response:
    request.app[RELEASED].set()
    return web.Response(text="released\n")


async def stats(request: web.Request) -> web.Response:
    adm = request.app.get(ADMISSION)
    return web.json_response(
        {
            "calls": request.app[CALLS],
            "records": request.app[RECORDS],
            "admission": adm.snapshot() if adm is not None else None,
        }
    )


def create_app() -> web.Application:
    app = web.Application()
    app[CALLS] = {"/cpu": 0, "/io": 0}
    app[RECORDS] = []
    app[RELEASED] = asyncio.Event()
    app.router.add_get("/cpu", cpu)
    app.router.add_get("/io", io)
    app.router.add_get("/hold", hold)
    app.router.add_get("/release", release)
    app.router.add_get("/control/stats", stats)
    return app
