"""A deliberately faulty HTTP/1.1 server that records what it did.

Run as ``python -m tests.drill.faulty FAULT [--every K] ...``.  It listens on
127.0.0.1 (port 0 unless ``--port``), writes ``PORT <n>`` as its first line on
stdout, serves until SIGTERM, then writes one JSON line with its records and exits.

Requests are numbered in the order they are read in full (1, 2, ...); request ``n``
gets the fault when ``n % every == 0``, the others a 200.  Faults, one per server:

* ``none``: always 200;
* ``reset``: read the request, then close with SO_LINGER 0 (an RST);
* ``eof``: read the request, then close normally without answering;
* ``status``: answer ``--code`` (503, 500, 404...);
* ``hang``: read the request and never answer (until the client gives up);
* ``refuse``: after request ``--every`` has been read, close the listening socket
  for ``--window`` seconds (connections are refused), answer it, then listen again;
* ``stall``: when request ``--every`` arrives, block the whole process for
  ``--window`` seconds (nothing is read, accepted or answered meanwhile);
* ``toggle``: answer ``--code`` between SIGUSR1 and SIGUSR2, else 200.

Records: ``counts`` (what each request got: "200", "503", "reset", "eof", "hang"),
and for refuse/stall/toggle the ``windows`` as ``time.monotonic()`` pairs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import struct
import sys
import time
from typing import Any

_RESPONSE = "HTTP/1.1 {code} X\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n{extra}\r\nok"


class Faulty:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.n = 0
        self.counts: dict[str, int] = {}
        self.windows: list[list[float]] = []
        self.toggled = False
        self.server: asyncio.Server | None = None
        self.port = args.port
        self.reopen: asyncio.Task[None] | None = None

    def record(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    async def listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(1024)
        self.port = sock.getsockname()[1]
        self.server = await asyncio.start_server(self.handle, sock=sock)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        a = self.args
        for _ in range(100_000):  # requests on one connection
            head = await reader.readuntil(b"\r\n\r\n")
            self.n += 1
            n = self.n
            close = b"connection: close" in head.lower()
            faulty = a.every > 0 and n % a.every == 0
            if a.fault == "refuse" and n == a.every:
                self.refuse_window()
            elif a.fault == "stall" and n == a.every:
                begin = time.monotonic()
                time.sleep(a.window)  # noqa: ASYNC251 (the fault itself: the whole server stops)
                self.windows.append([begin, time.monotonic()])
            elif faulty and a.fault == "reset":
                self.record("reset")
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            elif faulty and a.fault == "eof":
                self.record("eof")
                writer.close()
                return
            elif faulty and a.fault == "hang":
                self.record("hang")
                await reader.read()  # until the client closes or resets
                return
            code = 200
            if (faulty and a.fault == "status") or (a.fault == "toggle" and self.toggled):
                code = a.code
            self.record(str(code))
            extra = "Connection: close\r\n" if close else ""
            writer.write(_RESPONSE.format(code=code, extra=extra).encode())
            await writer.drain()
            if close:
                return

    def refuse_window(self) -> None:
        """Close the listening socket now (connects are refused), listen again later."""
        assert self.server is not None
        self.server.close()
        begin = time.monotonic()
        self.reopen = asyncio.get_running_loop().create_task(self._reopen(begin))

    async def _reopen(self, begin: float) -> None:
        await asyncio.sleep(self.args.window)
        await self.listen()
        self.windows.append([begin, time.monotonic()])

    def toggle(self, on: bool) -> None:
        self.toggled = on
        if on:
            self.windows.append([time.monotonic(), 0.0])
        elif self.windows:
            self.windows[-1][1] = time.monotonic()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    f = Faulty(args)
    await f.listen()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, f.toggle, True)
    loop.add_signal_handler(signal.SIGUSR2, f.toggle, False)
    print(f"PORT {f.port}", flush=True)
    await stop.wait()
    return {"counts": f.counts, "windows": f.windows, "requests": f.n}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument(
        "fault",
        choices=["none", "reset", "eof", "status", "hang", "refuse", "stall", "toggle"],
    )
    p.add_argument("--every", type=int, default=0)
    p.add_argument("--code", type=int, default=503)
    p.add_argument("--window", type=float, default=0.3)
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    result = asyncio.run(main_async(args))
    print(json.dumps(result), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
