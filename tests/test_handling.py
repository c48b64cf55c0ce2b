"""sdserve handles a request's outcomes as aiohttp does.

sdserve's protocol does aiohttp's ``RequestHandler._handle_request`` steps itself (one
coroutine less per request: :meth:`sdserve.drain.TrackedRequestHandler._handle_request`).
Each way a handler can end (a response, a raised or returned HTTP error, an exception, a
timeout, no response at all) is sent to sdserve and to bare aiohttp ``run_app`` serving the
same app, over keep-alive connections (a new one after a response that closes its own):
the answers must be the same, statuses, ``Connection`` headers and bodies. And aiohttp's
own version, which sdserve's follows, is pinned here: when an upgrade changes it, this
fails, and sdserve's copy of its steps is to be read again. So is aiohttp's
``data_received``, whose steps sdserve does itself while it sheds load (a request refused
as it is read: :meth:`sdserve.drain.TrackedRequestHandler._feed_shedding`); the bytes of
that refusal are the response the usual path gives, as aiohttp writes it.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import socket
import sys
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from sdserve.admission import REASONS
from sdserve.drain import _plain, _shed, _shed_raw
from tests.conftest import LauncherFactory
from tests.helpers import Response, read_response, request_bytes

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]
APP = "tests.apps.answers:create_app"
PATHS = ("/ok", "/raised", "/returned", "/crashes", "/times-out", "/nothing", "/ok", "/absent")
#: sha256 of the source of aiohttp 3.14's RequestHandler._handle_request (its steps are
#: those of 3.11, the oldest sdserve runs on, with newer annotations)
AIOHTTP_HANDLE_REQUEST = "a88a34ee65a2714c6b392d23963ba9a80e7d50d4889905cd949a94d479102d8f"
#: sha256 of the source of aiohttp 3.14's RequestHandler.data_received
AIOHTTP_DATA_RECEIVED = "1ee57ebe052e6c80ced26c96e4ccb1223172e1d55afba460353c5e414914d3f6"


async def answers(port: int) -> list[tuple[int, str, bytes]]:
    """Each of PATHS in turn, on one keep-alive connection until a response closes it
    (then on a new one): status, Connection header, body."""
    got: list[tuple[int, str, bytes]] = []
    async with asyncio.timeout(30):
        writer = None
        try:
            for path in PATHS:
                if writer is None:
                    reader, writer = await asyncio.open_connection(HOST, port)
                writer.write(request_bytes(path))
                response: Response = await read_response(reader)
                got.append((response.status, response.headers.get("connection", ""), response.body))
                if response.closes:
                    writer.close()
                    writer = None
        finally:
            if writer is not None:
                writer.close()
    return got


@pytest.mark.asyncio
async def test_a_refusal_as_read_is_the_answer_aiohttp_writes_for_the_usual_one() -> None:
    """The bytes written for a request refused as it is read are, but for the Date, what
    aiohttp writes for the usual path's refusal (the same status, headers and body)."""

    async def refuse(request: web.Request) -> web.StreamResponse:
        return _shed(request.match_info["reason"])

    app = web.Application()
    app.router.add_get("/{reason}", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(HOST, port)
            for reason in REASONS:
                writer.write(request_bytes(f"/{reason}"))
                usual = await read_response(reader)
                fed = asyncio.StreamReader()
                fed.feed_data(_shed_raw(reason))
                fed.feed_eof()
                raw = await read_response(fed)
                assert fed.at_eof()  # nothing written past the body
                assert raw.status == usual.status == 503
                assert raw.body == usual.body
                assert raw.headers.pop("date")
                assert usual.headers.pop("date")
                assert raw.headers == usual.headers
                assert raw.headers["retry-after"] == "1"
            writer.close()
    finally:
        await runner.cleanup()


def test_only_a_plain_target_is_taken_as_its_own_decoded_path() -> None:
    """Probes are exempt from shedding by their decoded path: a target with a query, an
    escape or in absolute form must be decoded (aiohttp's request.path), not compared raw."""
    assert _plain("/livez")
    assert not _plain("/livez?verbose=1")
    assert not _plain("/live%7A")
    assert not _plain("http://host/livez")
    assert not _plain("*")


@pytest.mark.parametrize(
    ("name", "digest", "ours"),
    [
        ("_handle_request", AIOHTTP_HANDLE_REQUEST, "_handle_request"),
        ("data_received", AIOHTTP_DATA_RECEIVED, "_feed_shedding"),
    ],
)
def test_aiohttp_code_sdserve_follows_is_the_version_it_follows(
    name: str, digest: str, ours: str
) -> None:
    source = inspect.getsource(getattr(RequestHandler, name))
    assert hashlib.sha256(source.encode()).hexdigest() == digest, (
        f"aiohttp's RequestHandler.{name} changed: read it against "
        f"sdserve.drain.TrackedRequestHandler.{ours}, then update the digest"
    )


@pytest.mark.asyncio
async def test_each_outcome_is_answered_as_bare_aiohttp_answers_it(
    make_launcher: LauncherFactory, port: int
) -> None:
    launcher = make_launcher(app=APP)
    await launcher.start()
    served = await answers(port)
    assert await launcher.stop() == 0

    with socket.create_server((HOST, 0)) as sock:
        code = (
            "import socket, sys; from aiohttp import web; import tests.apps.answers as a; "
            "web.run_app(a.create_app(), sock=socket.socket(fileno=int(sys.argv[1])), "
            "print=None, access_log=None)"
        )
        bare = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            str(sock.fileno()),
            cwd=ROOT,
            pass_fds=[sock.fileno()],
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            expected = await answers(sock.getsockname()[1])  # queued until it serves
        finally:
            bare.terminate()
            await asyncio.wait_for(bare.wait(), 30)

    assert [status for status, _, _ in served] == [200, 409, 202, 500, 504, 500, 200, 404]
    assert served == expected
