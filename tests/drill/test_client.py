"""The HTTP client's parser against raw responses sent over a real socket."""

from __future__ import annotations

import asyncio

import pytest

from sdserve.drill.client import HttpConn, open_socket, parse_target
from sdserve.drill.outcome import EOF, OTHER_ERROR, REFUSED

REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"5\r\nhel",
    b"lo\r\n6;ext=1\r\n world\r\n",
    b"0\r\n",
    b"\r\n",
)


async def exchange(*pieces: bytes, close: bool = False) -> tuple[int, bool]:
    """Serve ``pieces`` one write at a time to one request; the client's code and reuse."""

    handled = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
            if not close:
                await reader.read()  # until the client closes
        finally:
            writer.close()
            handled.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        sock = await open_socket(parse_target(f"http://127.0.0.1:{port}/"))
        assert not isinstance(sock, int)
        _, conn = await asyncio.get_running_loop().create_connection(HttpConn, sock=sock)
        code = await asyncio.wait_for(conn.send(REQUEST), 10)
        reusable = conn.reusable and not conn.closed
        conn.close()
        await asyncio.wait_for(handled.wait(), 10)
    finally:
        server.close()
        await server.wait_closed()
    return code, reusable


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("pieces", "close", "expected"),
    [
        ((b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",), False, (200, True)),
        ((b"HTTP/1.1 503 Busy\r\nContent-Len", b"gth: 0\r\n\r\n"), False, (503, True)),
        (CHUNKED, False, (200, True)),
        ((b"HTTP/1.1 204 No Content\r\n\r\n",), False, (204, True)),
        ((b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 No\r\nContent-Length: 0\r\n\r\n",), False,
         (404, True)),
        ((b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",), True,
         (200, False)),
        ((b"HTTP/1.0 200 OK\r\n\r\nuntil the end",), True, (200, False)),
        ((b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",), True, (EOF, False)),
        ((b"HTTP/1.1 200 OK\r\nContent-",), True, (EOF, False)),
        ((),  True, (EOF, False)),
        ((b"SSH-2.0-OpenSSH\r\n\r\n",), False, (OTHER_ERROR, False)),
    ],
)  # fmt: skip
async def test_responses(
    pieces: tuple[bytes, ...], close: bool, expected: tuple[int, bool]
) -> None:
    assert await exchange(*pieces, close=close) == expected


@pytest.mark.asyncio
async def test_nobody_listening_is_refused() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    assert await open_socket(parse_target(f"http://127.0.0.1:{port}/")) == REFUSED
