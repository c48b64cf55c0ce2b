"""The hello-world app every server in ``bench_throughput`` serves, as aiohttp and as ASGI.

The same 12-byte body and headers from each: an aiohttp handler for aiohttp, sdserve and
gunicorn's aiohttp workers; an ASGI callable for uvicorn and granian.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

BODY = b"Hello, world"


async def hello(request: web.Request) -> web.Response:
    return web.Response(body=BODY, content_type="text/plain")


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/", hello)
    return app


async def gunicorn_app() -> web.Application:
    """gunicorn's aiohttp workers take a coroutine that returns the app."""
    return create_app()


_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"12")],
}
_BODY = {"type": "http.response.body", "body": BODY}


async def asgi(
    scope: dict[str, Any],
    receive: Callable[[], Awaitable[dict[str, Any]]],
    send: Callable[[dict[str, Any]], Awaitable[None]],
) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send(_START)
    await send(_BODY)


def run_aiohttp(port: int, loop: str) -> None:
    """aiohttp's own ``run_app`` on ``loop`` ("asyncio" or "uvloop")."""
    event_loop = None
    if loop == "uvloop":
        import uvloop

        event_loop = uvloop.new_event_loop()
    web.run_app(
        create_app(),
        host="127.0.0.1",
        port=port,
        access_log=None,
        print=lambda *_: print("serving", flush=True),  # called once the sites listen
        loop=event_loop,
    )


if __name__ == "__main__":
    run_aiohttp(int(sys.argv[1]), sys.argv[2])
