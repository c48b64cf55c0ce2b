"""A lean HTTP/1.1 and WebSocket client on asyncio protocols.

The drill needs to know exactly how each request ended, and to send many of them
from few processes, so it speaks HTTP itself instead of going through a client
library.  A connection carries one request at a time (no pipelining); its result is
a code from :mod:`sdserve.drill.outcome` (the status code, or a transport class).
Nothing here ever retries.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from typing import Final, cast
from urllib.parse import urlsplit

from sdserve.drill.outcome import EOF, OTHER_ERROR, REFUSED, RESET, TIMEOUT, WS_ECHO_OK

_MAX_HEAD: Final = 64 * 1024
_UNTIL_CLOSE: Final = -3
_CHUNKED: Final = -2
_UNKNOWN: Final = -1


class TargetError(ValueError):
    """A target the drill refuses to load (not loopback, bad URL)."""


@dataclass(frozen=True)
class Endpoint:
    """A parsed target URL: where to connect and what to send."""

    url: str
    scheme: str
    host: str
    port: int
    path: str
    family: int

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def request_bytes(self, *, keepalive: bool) -> bytes:
        host = f"[{self.host}]" if self.family == socket.AF_INET6 else self.host
        conn = b"" if keepalive else b"Connection: close\r\n"
        return (
            f"GET {self.path} HTTP/1.1\r\nHost: {host}:{self.port}\r\n".encode("latin-1")
            + conn
            + b"User-Agent: sdserve-drill\r\n\r\n"
        )


def parse_target(url: str) -> Endpoint:
    """Parse ``http://`` or ``ws://`` URLs on loopback addresses only.

    ``localhost`` is read as 127.0.0.1.  Any other host is refused: the drill sends
    traffic only to this machine.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "ws"):
        raise TargetError(f"{url!r}: only http:// and ws:// URLs are supported")
    host = parts.hostname or ""
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise TargetError(f"{url!r}: the host must be a loopback address, not {host!r}") from None
    if not ip.is_loopback:
        raise TargetError(f"{url!r}: the drill only sends traffic to 127.0.0.1 or ::1")
    port = parts.port or 80
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return Endpoint(url, parts.scheme, str(ip), port, path, family)


def transport_code(exc: BaseException | None) -> int:
    """The class of a connection that ended with ``exc`` before the response was complete."""
    if exc is None:
        return EOF
    if isinstance(exc, ConnectionRefusedError):
        return REFUSED
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return RESET
    if isinstance(exc, TimeoutError):
        return TIMEOUT
    return OTHER_ERROR


async def open_socket(ep: Endpoint) -> socket.socket | int:
    """Connect a non-blocking socket to ``ep``; an outcome code if that fails."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(ep.family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.sock_connect(sock, ep.address)
    except OSError as exc:
        sock.close()
        return transport_code(exc)
    except BaseException:
        sock.close()
        raise
    return sock


class HttpConn(asyncio.Protocol):
    """One HTTP/1.1 connection; :meth:`send` one request at a time."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        #: Whether the last response allows the connection to be reused.
        self.reusable = False
        self._fut: asyncio.Future[int] | None = None
        self._buf = bytearray()
        self._status = 0
        self._body = -1
        self._need = _UNKNOWN
        self._scan = 0
        self._copied = False

    # asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        fut = self._fut
        if fut is None or fut.done():
            # Bytes nobody asked for: the connection cannot be trusted any more.
            self.reusable = False
            self._close()
            return
        if self._buf:
            self._buf += data
            code = self._parse(self._buf)
        else:
            self._copied = False
            code = self._parse(data)  # the usual case: the whole response in one read
            if not code and not self._copied:
                self._buf += data
        if code:
            self._done(code)

    def eof_received(self) -> bool:
        fut = self._fut
        if fut is not None and not fut.done():
            self._done(self._status if self._need == _UNTIL_CLOSE else EOF)
        self.reusable = False
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        fut = self._fut
        if fut is not None and not fut.done():
            if exc is None and self._need == _UNTIL_CLOSE:
                self._done(self._status)
            else:
                self._done(transport_code(exc))

    # requests -----------------------------------------------------------------------
    def send(self, data: bytes) -> asyncio.Future[int]:
        """Send one request; the future gets its outcome code."""
        assert self.transport is not None
        fut: asyncio.Future[int] = self._loop.create_future()
        self._fut = fut
        self.reusable = False
        self._buf.clear()
        self._status = 0
        self._body = -1
        self._need = _UNKNOWN
        self._scan = 0
        self.transport.write(data)
        return fut

    def expire(self) -> None:
        """The request timed out: count it and drop the connection."""
        fut = self._fut
        if fut is not None and not fut.done():
            self._done(TIMEOUT)
            self.reusable = False
            if self.transport is not None:
                self.transport.abort()

    def close(self) -> None:
        self.reusable = False
        self._close()

    def _close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    def _done(self, code: int) -> None:
        fut = self._fut
        self._fut = None
        if fut is not None and not fut.done():
            fut.set_result(code)

    def _parse(self, buf: bytes | bytearray) -> int:
        """0 while incomplete, else the outcome code; ``buf`` holds the response so far."""
        if self._body < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return OTHER_ERROR if len(buf) > _MAX_HEAD else 0
            head = bytes(buf[:end]).lower()
            if not head.startswith(b"http/1.") or len(head) < 12:
                return OTHER_ERROR
            try:
                status = int(head[9:12])
            except ValueError:
                return OTHER_ERROR
            if 100 <= status < 200 and status != 101:
                # an interim response: the real one follows
                self._buf = bytearray(buf[end + 4 :])
                self._copied = True
                return self._parse(self._buf)
            self._status = status
            self._body = end + 4
            keep = head.startswith(b"http/1.1") and b"\r\nconnection: close" not in head
            if status in (101, 204, 304):
                self._need = self._body
            elif b"\r\ntransfer-encoding: chunked" in head:
                self._need = _CHUNKED
                self._scan = self._body
            else:
                at = head.find(b"\r\ncontent-length:")
                if at < 0:
                    self._need = _UNTIL_CLOSE
                    keep = False
                else:
                    stop = head.find(b"\r\n", at + 2)
                    try:
                        length = int(head[at + 17 : stop if stop >= 0 else len(head)])
                    except ValueError:
                        return OTHER_ERROR
                    self._need = self._body + length
            self.reusable = keep
        need = self._need
        if need >= 0:
            if len(buf) < need:
                return 0
            if len(buf) > need:
                self.reusable = False
            return self._status
        if need == _CHUNKED:
            return self._parse_chunks(buf)
        return 0

    def _parse_chunks(self, buf: bytes | bytearray) -> int:
        pos = self._scan
        for _ in range(len(buf)):  # bounded: each turn consumes at least 3 bytes
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return 0
            try:
                size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
            except ValueError:
                return OTHER_ERROR
            if size == 0:
                if buf[eol + 2 : eol + 4] == b"\r\n":
                    return self._status
                if buf.find(b"\r\n\r\n", eol) >= 0:
                    return self._status
                return 0
            nxt = eol + 2 + size + 2
            if len(buf) < nxt:
                self._scan = pos
                return 0
            pos = nxt
            self._scan = pos
        return 0


def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if n == 0:
        return b""
    k = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ k).to_bytes(n, "big")


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame."""
    key = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + key + _mask(payload, key)


class WsConn(asyncio.Protocol):
    """A WebSocket client connection: handshake, then echo round trips."""

    def __init__(self, ep: Endpoint) -> None:
        self._loop = asyncio.get_running_loop()
        self._ep = ep
        self.transport: asyncio.Transport | None = None
        self.closed = False
        #: The close code the server sent, if it closed cleanly.
        self.close_code: int | None = None
        self.open = False
        self._buf = bytearray()
        self._fut: asyncio.Future[int] | None = None
        self._expect = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def handshake(self) -> asyncio.Future[int]:
        """Send the upgrade request; the future gets the status (101 on success)."""
        assert self.transport is not None
        key = base64.b64encode(os.urandom(16)).decode()
        host = f"[{self._ep.host}]" if self._ep.family == socket.AF_INET6 else self._ep.host
        req = (
            f"GET {self._ep.path} HTTP/1.1\r\nHost: {host}:{self._ep.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self._fut = self._loop.create_future()
        self.transport.write(req.encode("latin-1"))
        return self._fut

    def echo(self, payload: bytes) -> asyncio.Future[int]:
        """Send a text frame; the future gets WS_ECHO_OK when it comes back."""
        assert self.transport is not None
        self._fut = self._loop.create_future()
        self._expect = payload
        self.transport.write(ws_frame(0x1, payload))
        return self._fut

    def expire(self) -> None:
        if self._fut is not None and not self._fut.done():
            self._done(TIMEOUT)
            if self.transport is not None:
                self.transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            if self.open and self.close_code is None:
                self.transport.write(ws_frame(0x8, struct.pack("!H", 1000)))
            self.closed = True
            self.transport.close()

    def _done(self, code: int) -> None:
        fut = self._fut
        self._fut = None
        if fut is not None and not fut.done():
            fut.set_result(code)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self.open:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > _MAX_HEAD:
                    self._done(OTHER_ERROR)
                    self.close()
                return
            head = bytes(self._buf[:end])
            del self._buf[: end + 4]
            try:
                status = int(head[9:12])
            except ValueError:
                status = OTHER_ERROR
            self.open = status == 101
            self._done(status)
            if not self.open:
                self.close()
                return
        self._frames()

    def _frames(self) -> None:
        buf = self._buf
        for _ in range(len(buf) + 1):  # bounded: each frame consumes at least 2 bytes
            if len(buf) < 2:
                return
            b0, b1 = buf[0], buf[1]
            n = b1 & 0x7F
            at = 2
            if n == 126:
                if len(buf) < 4:
                    return
                n = struct.unpack_from("!H", buf, 2)[0]
                at = 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n = struct.unpack_from("!Q", buf, 2)[0]
                at = 10
            if b1 & 0x80:
                at += 4  # a masked server frame is a protocol error; skip the key anyway
            if len(buf) < at + n:
                return
            payload = bytes(buf[at : at + n])
            del buf[: at + n]
            self._frame(b0 & 0x0F, payload)

    def _frame(self, opcode: int, payload: bytes) -> None:
        if opcode in (0x1, 0x2):
            if self._fut is not None:
                self._done(WS_ECHO_OK if payload == self._expect else OTHER_ERROR)
        elif opcode == 0x8:
            self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            if self.transport is not None and not self.closed:
                self.transport.write(ws_frame(0x8, payload[:2]))
            self._done(EOF)  # an echo still outstanding was never answered
            self.close()
        elif opcode == 0x9 and self.transport is not None and not self.closed:
            self.transport.write(ws_frame(0xA, payload))

    def eof_received(self) -> bool:
        self._done(EOF)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._done(transport_code(exc))
