"""A server-sent-events route ended from ``on_shutdown``, the way aiohttp's documentation
ends long streams (plain aiohttp, no sdserve API): shared by the test and benchmark apps.

``GET /events``: a ``hello`` event, then nothing until the app's ``on_shutdown`` hook runs,
then a ``goodbye`` event and the end of the stream.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

STREAMS_END = web.AppKey("streams_end", asyncio.Event)


async def events(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b"data: hello\n\n")
    await request.app[STREAMS_END].wait()
    await response.write(b"event: goodbye\ndata: bye\n\n")
    await response.write_eof()
    return response


async def end_streams(app: web.Application) -> None:
    app[STREAMS_END].set()


def add_events(app: web.Application) -> None:
    """``/events`` on ``app``, and the ``on_shutdown`` hook that ends its streams."""
    app.router.add_get("/events", events)
    app[STREAMS_END] = asyncio.Event()
    app.on_shutdown.append(end_streams)
