"""An application whose code a test "releases" by writing it to disk, for reload tests.

:func:`source` renders the module ``relapp``; every answer starts with ``VERSION PID``:

- ``GET /``: at once;
- ``GET /slow?ms=N``: after N ms;
- ``GET /block?s=N``: tells the gate (``TESTAPP_GATE``) ``block-PID``, then blocks the event
  loop for N seconds (a stuck worker, for the watchdog);
- ``GET /resolve?name=NAME``: ``loop.getaddrinfo`` of NAME, as a client library would.

``extra`` lines go into ``create_app`` (indented by four spaces), e.g. one of
:data:`BAD_RELEASES`.
"""

from __future__ import annotations

TEMPLATE = """\
import os
from aiohttp import web
from sdserve import add_check

VERSION = {version!r}


async def index(request):
    return web.Response(text=f"{{VERSION}} {{os.getpid()}}\\n")


def create_app():
    app = web.Application()
    app.router.add_get("/", index)
{extra}
    app.router.add_get("/slow", slow)
    app.router.add_get("/block", block)
    app.router.add_get("/resolve", resolve)
    return app


async def resolve(request):
    import asyncio

    infos = await asyncio.get_running_loop().getaddrinfo(request.query["name"], 80)
    return web.Response(text=f"{{VERSION}} {{os.getpid()}} {{infos[0][4][0]}}\\n")


async def slow(request):
    import asyncio

    await asyncio.sleep(int(request.query.get("ms", "100")) / 1000)
    return web.Response(text=f"{{VERSION}} {{os.getpid()}} slow\\n")


async def block(request):
    import asyncio, time

    _reader, writer = await asyncio.open_unix_connection(os.environ["TESTAPP_GATE"])
    writer.write(f"block-{{os.getpid()}}\\n".encode())
    await writer.drain()
    time.sleep(float(request.query.get("s", "5")))
    writer.close()
    return web.Response(text=f"{{VERSION}} {{os.getpid()}} unblocked\\n")
"""

BAD_RELEASES = {
    "syntax-error": "    def broken(:\n",
    "failing-check": (
        "    async def db():\n        raise ConnectionRefusedError('db is down')\n"
        "    add_check(app, 'db', db, timeout=0.5)\n"
    ),
    "exits-at-start": "    os._exit(70)\n",
}


def source(version: str, extra: str = "") -> str:
    return TEMPLATE.format(version=version, extra=extra or "    pass")
