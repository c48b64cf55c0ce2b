"""A minimal, fast HTTP/1.1 target (uvloop, fixed 200 response) for client benchmarks.

``python -m tests.bench.target`` listens on 127.0.0.1 (an ephemeral port), prints
``PORT <n>`` and serves until SIGTERM.  It answers every request on a connection
with the same small response and keeps the connection open, so that the clients,
not the server, are what a benchmark measures.
"""

from __future__ import annotations

import asyncio
import signal
import socket

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
CLOSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


class Answer(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        data = self.pending + data
        n = data.count(b"\r\n\r\n")
        self.pending = data[data.rfind(b"\r\n\r\n") + 4 :] if n else data
        if n:
            if b"onnection: close" in data:
                self.transport.write(RESPONSE * (n - 1) + CLOSE)
                self.transport.close()
            else:
                self.transport.write(RESPONSE * n)


async def serve() -> None:
    loop = asyncio.get_running_loop()
    sock = socket.create_server(("127.0.0.1", 0), backlog=4096)
    server = await loop.create_server(Answer, sock=sock)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    await stop.wait()
    server.close()


def main() -> None:
    import uvloop

    uvloop.run(serve())


if __name__ == "__main__":
    main()
