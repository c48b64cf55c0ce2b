"""Test helpers: a gate that holds requests, a strict HTTP/1.1 client, a bounded load."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from sdserve.template import is_template
from tests.apps.release import source

HOST = "127.0.0.1"


class Gate:
    """A unix socket server: each held request reports here and waits for its release."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.held: dict[str, asyncio.StreamWriter] = {}
        self._arrived = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._on_client, path=str(self.path))

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        name = (await reader.readline()).decode().strip()
        previous = self.held.pop(name, None)
        if previous is not None:  # the same name again (a retried check): keep the newest
            previous.close()
        self.held[name] = writer
        self._arrived.set()

    async def wait_held(self, name: str, timeout: float = 10.0) -> None:
        await self._wait(lambda n: n == name, f"request {name!r} never reached the gate", timeout)

    async def wait_prefix(self, prefix: str, timeout: float = 10.0) -> str:
        """The first held name that starts with ``prefix`` (waits for one to arrive)."""
        missing = f"no request named {prefix}* reached the gate"
        return await self._wait(lambda n: n.startswith(prefix), missing, timeout)

    async def _wait(self, match: Callable[[str], bool], missing: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            found = sorted(n for n in self.held if match(n))
            if found:
                return found[0]
            self._arrived.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{missing} within {timeout:g}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    def release(self, name: str) -> None:
        writer = self.held.pop(name)
        writer.write(b"x")
        writer.close()

    async def close(self) -> None:
        for writer in self.held.values():
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def closes(self) -> bool:
        return self.headers.get("connection", "").lower() == "close"


class ProtocolError(Exception):
    """The server closed or broke the connection before a whole response."""


async def read_response(reader: asyncio.StreamReader) -> Response:
    """Read one HTTP/1.1 response (Content-Length bodies only, as aiohttp sends here)."""
    status_line = await reader.readline()
    if not status_line:
        raise ProtocolError("eof")
    parts = status_line.decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise ProtocolError(f"bad status line {status_line!r}")
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if not line:
            raise ProtocolError("eof in headers")
        if line in (b"\r\n", b"\n"):
            break
        key, _, value = line.decode("latin-1").partition(":")
        headers[key.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError("eof in body") from exc
    return Response(int(parts[1]), headers, body)


def request_bytes(path: str = "/", close: bool = False) -> bytes:
    extra = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n".encode()


async def get(host: str, port: int, path: str = "/", timeout: float = 10.0) -> Response:
    """One request on a new connection."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(request_bytes(path, close=True))
            return await read_response(reader)
        finally:
            writer.close()


def classify(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "reset"
    if isinstance(exc, ProtocolError):
        return "eof"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return type(exc).__name__


#: a load client gives up after this many failures in all (keeps a broken server bounded)
MAX_FAILURES = 1000


@dataclass
class LoadStats:
    ok: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    longest: float = 0.0
    _progress: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def total_failed(self) -> int:
        return sum(self.failed.values())

    @property
    def total_ok(self) -> int:
        return sum(self.ok.values())

    def record(self, kind: str, started: float) -> None:
        self.ok[kind] += 1
        self.longest = max(self.longest, time.monotonic() - started)
        self._progress.set()

    async def wait_ok(self, target: int, timeout: float) -> None:
        """Wait until ``target`` requests in all have succeeded."""
        async with asyncio.timeout(timeout):
            while self.total_ok < target:
                self._progress.clear()
                await self._progress.wait()


async def _keepalive_client(host: str, port: int, stop: asyncio.Event, stats: LoadStats) -> None:
    """Reuses one connection until the server says Connection: close; never retries."""
    while not stop.is_set() and stats.total_failed < MAX_FAILURES:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as exc:
            stats.failed[f"keepalive:{classify(exc)}"] += 1
            continue
        try:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    async with asyncio.timeout(30):
                        writer.write(request_bytes("/"))
                        response = await read_response(reader)
                except (OSError, ProtocolError, TimeoutError) as exc:
                    stats.failed[f"keepalive:{classify(exc)}"] += 1
                    break
                if response.status != 200:
                    stats.failed[f"keepalive:{response.status}"] += 1
                elif response.closes:
                    stats.record("keepalive", started)
                    break
                else:
                    stats.record("keepalive", started)
        finally:
            writer.close()


async def _new_connection_client(
    host: str, port: int, stop: asyncio.Event, stats: LoadStats
) -> None:
    """A new connection per request; never retries."""
    while not stop.is_set() and stats.total_failed < MAX_FAILURES:
        started = time.monotonic()
        try:
            response = await get(host, port, "/", timeout=30)
        except (OSError, ProtocolError, TimeoutError) as exc:
            stats.failed[f"newconn:{classify(exc)}"] += 1
            continue
        if response.status != 200:
            stats.failed[f"newconn:{response.status}"] += 1
        else:
            stats.record("newconn", started)


@contextlib.asynccontextmanager
async def load(host: str, port: int, keepalive: int = 4, newconn: int = 4):  # type: ignore[no-untyped-def]
    """Run keep-alive and new-connection clients until the block ends; yields the stats.

    A failed request is counted and never retried; the client goes on with a new
    connection. Past MAX_FAILURES failures in all, the clients stop.
    """
    stats = LoadStats()
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(_keepalive_client(host, port, stop, stats)) for _ in range(keepalive)
    ] + [
        asyncio.create_task(_new_connection_client(host, port, stop, stats)) for _ in range(newconn)
    ]
    try:
        yield stats
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)


# -- processes -----------------------------------------------------------------------


def write_app(directory: Path, version: str, extra: str = "") -> None:
    (directory / "relapp.py").write_text(source(version, extra))


def children(pid: int) -> list[int]:
    """``pid``'s children, but a warm template (a supervisor's: they are its workers)."""
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split() if not is_template(int(p))]


def process_state(pid: int) -> str:
    """The state letter from /proc/PID/stat (R, S, Z...), or "gone"."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "gone"
    return stat.rsplit(")", 1)[1].split()[0]


async def wait_exit(pid: int, timeout: float) -> None:
    """Wait for a process that is not our child to exit, on its pidfd (no polling)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not gone.done():
            gone.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await asyncio.wait_for(gone, timeout)
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def versions(port: int, n: int = 20) -> set[str]:
    answers = [await get(HOST, port, "/") for _ in range(n)]
    assert all(a.status == 200 for a in answers)
    return {a.body.split()[0].decode() for a in answers}


# -- pooled keep-alive clients -------------------------------------------------------


@dataclass
class PoolStats:
    """What pooled keep-alive clients saw: requests, failures, and their connections."""

    ok: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    #: connections opened in all (the pool's size at first; more are reconnects)
    connections: int = 0
    #: connections the server closed: by Connection: close, or an EOF seen while idle
    closed_by_server: int = 0
    longest: float = 0.0
    #: which server processes answered (the first word after the version)
    pids: Counter[str] = field(default_factory=Counter)
    _progress: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def total_failed(self) -> int:
        return sum(self.failed.values())

    async def wait_ok(self, target: int, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while self.ok < target:
                self._progress.clear()
                await self._progress.wait()

    async def wait_pid(self, pids: Callable[[set[str]], bool], timeout: float) -> None:
        """Until the set of answering processes seen so far satisfies ``pids``."""
        async with asyncio.timeout(timeout):
            while not pids(set(self.pids)):
                self._progress.clear()
                await self._progress.wait()


async def _pooled_client(
    address: tuple[str, int], stop: asyncio.Event, stats: PoolStats, rng: random.Random, gap: float
) -> None:
    """One connection of a pool, kept as long as the server keeps it: a request at a random
    moment (a pause of 0 to ``gap`` seconds, often none), never retried."""
    while not stop.is_set() and stats.total_failed < MAX_FAILURES:
        try:
            reader, writer = await asyncio.open_connection(*address)
        except OSError as exc:
            stats.failed[classify(exc)] += 1
            continue
        stats.connections += 1
        try:
            while not stop.is_set():
                pause = rng.choice((0.0, rng.uniform(0, gap)))
                if pause:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(pause):
                            await stop.wait()
                if reader.at_eof():
                    stats.closed_by_server += 1  # closed while idle, seen before sending
                    break
                started = time.monotonic()
                try:
                    async with asyncio.timeout(30):
                        writer.write(request_bytes("/"))
                        response = await read_response(reader)
                except (OSError, ProtocolError, TimeoutError) as exc:
                    stats.failed[classify(exc)] += 1
                    break
                stats.longest = max(stats.longest, time.monotonic() - started)
                if response.status != 200:
                    stats.failed[str(response.status)] += 1
                    continue
                stats.ok += 1
                words = response.body.split()
                if len(words) > 1:
                    stats.pids[words[1].decode()] += 1
                stats._progress.set()
                if response.closes:
                    stats.closed_by_server += 1
                    break
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def pooled_load(
    host: str, port: int, connections: int = 16, gap: float = 0.005, seed: int = 1
) -> AsyncIterator[PoolStats]:
    """A pool of keep-alive connections, each sending at random moments, until the block
    ends; yields the :class:`PoolStats`. A failed request is counted, never retried."""
    stats = PoolStats()
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(
            _pooled_client((host, port), stop, stats, random.Random(seed * 1000 + i), gap)
        )
        for i in range(connections)
    ]
    try:
        yield stats
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
