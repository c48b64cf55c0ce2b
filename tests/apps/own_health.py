"""An application with its own ``/livez`` route (it clashes with sdserve's health route)."""

from __future__ import annotations

from aiohttp import web


async def livez(request: web.Request) -> web.Response:
    return web.Response(text="mine\n")


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/livez", livez)
    return app
