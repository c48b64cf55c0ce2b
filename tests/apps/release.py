"""An application whose code a test "releases" by writing it to disk, for reload tests.

:func:`source` renders the module ``relapp``: ``GET /`` answers ``VERSION PID``;
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
    return app
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
