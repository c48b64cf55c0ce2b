"""An app that shows what it sees of the request: its trace id, client and scheme."""

from __future__ import annotations

from aiohttp import web

from sdserve.accesslog import trace_id


async def whoami(request: web.Request) -> web.Response:
    return web.json_response(
        {"trace_id": trace_id(request), "remote": request.remote, "scheme": request.scheme}
    )


async def fail(request: web.Request) -> web.Response:
    return web.Response(status=503, text="down\n")


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/whoami", whoami)
    app.router.add_get("/items/{id}", whoami)
    app.router.add_get("/fail", fail)
    return app
