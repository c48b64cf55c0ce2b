"""An app whose handlers end each way aiohttp handles: a response, a raised HTTP error, a
returned one (deprecated), an exception, a timeout, a response that is not one."""

from __future__ import annotations

import asyncio

from aiohttp import web


async def ok(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def raised(request: web.Request) -> web.Response:
    raise web.HTTPConflict(text="conflict\n")


async def returned(request: web.Request) -> web.Response:
    return web.HTTPAccepted(text="accepted\n")


async def crashes(request: web.Request) -> web.Response:
    raise RuntimeError("the handler failed")


async def times_out(request: web.Request) -> web.Response:
    async with asyncio.timeout(0):
        await asyncio.sleep(1)
    return web.Response(text="not reached\n")


async def nothing(request: web.Request) -> web.Response:
    return None  # type: ignore[return-value]


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/raised", raised)
    app.router.add_get("/returned", returned)
    app.router.add_get("/crashes", crashes)
    app.router.add_get("/times-out", times_out)
    app.router.add_get("/nothing", nothing)
    return app
