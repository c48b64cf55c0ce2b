"""The application of the drain benchmark (``bench_drain``), plain aiohttp, no sdserve API.

- ``GET /``: a fast 200.
- ``GET /slow?tag=T``: answers 200 after 300 ms (the app's own latency). When
  ``DRAIN_APP_ARRIVALS`` names a unix socket, the handler first writes ``T`` and a
  newline to it, so the benchmark knows the request has reached the handler.
- ``GET /events``: server-sent events ended from ``on_shutdown``
  (:mod:`tests.apps.streams`).

``create_app()`` is the factory sdserve runs. ``python -m tests.bench.drain_app --fd N``
serves it with aiohttp's own ``web.run_app`` on the listening socket inherited as fd
``N`` (the baseline).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
from collections.abc import Sequence

from aiohttp import web

from tests.apps.streams import add_events

ARRIVALS_ENV = "DRAIN_APP_ARRIVALS"
SLOW_SECONDS = 0.3


async def index(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def slow(request: web.Request) -> web.Response:
    if path := os.environ.get(ARRIVALS_ENV):
        _reader, writer = await asyncio.open_unix_connection(path)
        try:
            writer.write(request.query.get("tag", "").encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()
    await asyncio.sleep(SLOW_SECONDS)  # the application's own latency
    return web.Response(text="slow\n")


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/slow", slow)
    add_events(app)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="serve the drain benchmark's app with aiohttp")
    parser.add_argument("--fd", type=int, required=True, help="an inherited listening socket")
    parser.add_argument("--shutdown-timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    web.run_app(
        create_app(),
        sock=socket.socket(fileno=args.fd),
        shutdown_timeout=args.shutdown_timeout,
        handle_signals=True,
        print=None,
    )


if __name__ == "__main__":
    main()
