"""An example application packaged on top of sdserve: see packaging/README.md."""

from __future__ import annotations

from aiohttp import web


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="hello from sdserve-hello\n")


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/", hello)
    return app
