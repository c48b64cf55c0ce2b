"""Drain time, SIGTERM to exit, of sdserve and of aiohttp's own ``web.run_app``.

Both serve the same application (:mod:`tests.bench.drain_app`) with
``shutdown_timeout`` 5 s, on a listening socket made here and passed down, and get the
same clients. One drain: start a server, bring a fixed mix of clients into their
states, send SIGTERM, and time the signal to the process's exit. The mix:

- idle: made one request on a keep-alive connection, then sends nothing;
- busy: a request in flight to ``/slow`` (answered after 300 ms); it has reached the
  handler (the handler reports its arrival on a unix socket) before the signal;
- trickling: after one complete request, sends the start of another one byte every
  0.5 s and never finishes it (slowloris-like); its first byte is sent before the signal;
- streaming: reading ``/events`` (server-sent events), which the app's ``on_shutdown``
  hook ends with a goodbye event; the first event has arrived before the signal.

sdserve runs in one process (``--workers 0``) through the launcher, which plays
systemd's part; its other settings are its defaults (idle_grace 1 s, header_timeout
10 s, keepalive_timeout 15 s). aiohttp runs ``web.run_app`` with
``handle_signals=True``, started through the same launcher (READY=1 is not awaited
for it: its first answers show it serves). Drains run in batches, both servers side by
side, each on its own socket; every drain's own signal-to-exit time is measured.
``SDS_BENCH_DRAINS`` (default 100) sets the drains per server,
``SDS_BENCH_DRAIN_BATCH`` (default 5) the drains per server in one batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdserve.launcher import Instance, Launcher
from tests.bench.drain_app import ARRIVALS_ENV

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.bench.drain_app"
SHUTDOWN_TIMEOUT = 5.0
SERVERS = ("sdserve", "aiohttp")
MIX = {"idle": 4, "busy": 4, "trickle": 2, "stream": 2}
TRICKLE_EVERY = 0.5
#: what a trickling client sends after its first request: it never completes
TRICKLE_BYTES = b"GET /never HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Trickle: " + b"a" * 60
#: upper bounds, never used to wait for a state
START_TIMEOUT = 60.0
IO_TIMEOUT = 30.0
EXIT_TIMEOUT = SHUTDOWN_TIMEOUT + 25.0
#: the most bytes a client reads from one connection
READ_CAP = 1 << 20


class BenchError(Exception):
    """A drain could not be set up as described (the benchmark itself failed)."""


def _request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """One response with a Content-Length body (all of this app's but ``/events``)."""
    status, headers = await _read_head(reader)
    await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers


async def _read_until(
    reader: asyncio.StreamReader, data: bytearray, marker: bytes | None, timeout: float
) -> str:
    """Read into ``data`` until ``marker`` is in it (``"found"``), or the connection ends:
    ``"eof"``, ``"reset"``, or ``"timeout"`` (``marker`` None: until the end)."""
    try:
        async with asyncio.timeout(timeout):
            while len(data) < READ_CAP:
                if marker is not None and marker in data:
                    return "found"
                chunk = await reader.read(65536)
                if not chunk:
                    return "eof"
                data += chunk
    except TimeoutError:
        return "timeout"
    except ConnectionError:
        return "reset"
    return "found" if marker is not None and marker in data else "too much data"


class Arrivals:
    """A unix socket the app's ``/slow`` handler writes its tag to as it starts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._events: dict[str, asyncio.Event] = {}
        self._server: asyncio.Server | None = None

    def _event(self, tag: str) -> asyncio.Event:
        return self._events.setdefault(tag, asyncio.Event())

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._on_client, path=str(self.path))

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), IO_TIMEOUT)
        except (TimeoutError, OSError):
            line = b""
        finally:
            writer.close()
        if line.endswith(b"\n"):
            self._event(line.decode().strip()).set()

    async def wait(self, tag: str) -> None:
        try:
            await asyncio.wait_for(self._event(tag).wait(), IO_TIMEOUT)
        finally:
            self._events.pop(tag, None)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@dataclass
class Slot:
    """One server's place in a batch: its launcher and its listening socket."""

    server: str
    launcher: Launcher
    sock: socket.socket

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])


@dataclass
class ClientResult:
    kind: str
    outcome: str
    #: when the client saw the server end its connection (monotonic), None if it did not
    closed: float | None
    failed: bool = False


#: a client: runs its whole life, sets its future once in its state, reports how it ended
ClientFactory = Callable[[asyncio.Future[None]], Coroutine[Any, Any, ClientResult]]


@dataclass
class Drain:
    """One drain of one server: its process, its clients, its figures."""

    slot: Slot
    number: int
    arrivals: Arrivals
    instance: Instance | None = None
    signalled: float | None = None
    exited_at: float | None = None
    status: int | None = None
    results: list[ClientResult] = field(default_factory=list)
    _go: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[ClientResult]] = field(default_factory=list)
    #: set by each trickling client as its first trickled byte is sent
    _trickle_started: list[asyncio.Future[None]] = field(default_factory=list)

    @property
    def took(self) -> float:
        assert self.signalled is not None
        assert self.exited_at is not None
        return self.exited_at - self.signalled

    # -- phases -------------------------------------------------------------------------

    async def start(self) -> None:
        if self.slot.server == "sdserve":
            self.instance = await self.slot.launcher.start(timeout=START_TIMEOUT)
        else:  # aiohttp sends no READY=1: its first answers (settle) show it serves
            self.instance = await self.slot.launcher.spawn()
        self.instance.exited.add_done_callback(self._on_exit)

    def _on_exit(self, _task: object) -> None:
        self.exited_at = time.monotonic()

    async def settle(self) -> None:
        """Idle, trickling and streaming clients in their states (trickling: one request
        done, waiting for the go to start trickling)."""
        waits = []
        for kind, client in (("idle", self._idle), ("trickle", self._trickle)):
            for _ in range(MIX[kind]):
                waits.append(self._spawn(kind, client))
        for _ in range(MIX["stream"]):
            waits.append(self._spawn("stream", self._stream))
        await asyncio.gather(*waits)

    async def fire(self) -> None:
        """Trickling starts and busy requests reach the handler; then SIGTERM, and the exit."""
        self._go.set()
        tags = [f"d{self.number}-{self.slot.server}-busy{i}" for i in range(MIX["busy"])]
        waits = [self._reached("busy", self.arrivals.wait(tag)) for tag in tags]
        for tag in tags:
            self._tasks.append(asyncio.create_task(self._busy(tag)))
        waits += [self._reached("trickle", ready) for ready in self._trickle_started]
        await asyncio.gather(*waits)
        assert self.instance is not None
        self.signalled = time.monotonic()
        self.slot.launcher.send_signal(signal.SIGTERM)
        try:
            self.status = await asyncio.wait_for(asyncio.shield(self.instance.exited), EXIT_TIMEOUT)
        except TimeoutError:
            self.status = None  # killed by the clean-up; counted as a non-zero exit

    async def collect(self) -> None:
        self.results = list(await asyncio.gather(*self._tasks))

    async def abort(self) -> None:
        """Whatever is left: the clients cancelled, the process killed with its group."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        instance = self.instance
        if instance is not None and not instance.exited.done():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(instance.pid, signal.SIGKILL)
            await instance.exited

    # -- clients ------------------------------------------------------------------------

    async def _spawn(self, kind: str, client: ClientFactory) -> None:
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tasks.append(asyncio.create_task(client(ready)))
        await self._reached(kind, ready)

    async def _reached(self, kind: str, ready: Awaitable[None]) -> None:
        """Wait for a client's state; a BenchError if it or the server ends first."""
        assert self.instance is not None
        waiting = asyncio.ensure_future(ready)
        watched = {waiting, self.instance.exited, *self._tasks}
        try:
            deadline = time.monotonic() + IO_TIMEOUT
            while not waiting.done():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                done, _ = await asyncio.wait(
                    watched, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                if waiting in done:
                    break
                if self.instance.exited in done:
                    raise BenchError(
                        f"{self.slot.server} exited ({self.instance.exited.result()}) before "
                        f"its clients were in their states:\n{self.instance.log_text()[-3000:]}"
                    )
                for task in done:
                    exc = task.exception()
                    ended = repr(exc) if exc is not None else repr(task.result())
                    raise BenchError(
                        f"a {kind} client of {self.slot.server} ended before its state: {ended}"
                    ) from exc
            if not waiting.done():
                raise BenchError(f"a {kind} client of {self.slot.server} not ready in time")
            waiting.result()
        finally:
            waiting.cancel()

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", self.slot.port), IO_TIMEOUT
        )

    async def _first_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(_request("/"))
        await writer.drain()
        # the server may still be starting (aiohttp): the connection waits in its queue
        status, _ = await asyncio.wait_for(_read_response(reader), START_TIMEOUT)
        if status != 200:
            raise BenchError(f"GET / answered {status}")

    async def _idle(self, ready: asyncio.Future[None]) -> ClientResult:
        reader, writer = await self._open()
        try:
            await self._first_request(reader, writer)
            ready.set_result(None)
            data = bytearray()
            how = await _read_until(reader, data, None, EXIT_TIMEOUT + IO_TIMEOUT)
            closed = time.monotonic() if how in ("eof", "reset") else None
            outcome = f"{how} after {_describe(data)}" if data else f"closed: {how}"
            return ClientResult("idle", outcome, closed)
        finally:
            writer.close()

    async def _trickle(self, ready: asyncio.Future[None]) -> ClientResult:
        reader, writer = await self._open()
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._trickle_started.append(started)
        try:
            await self._first_request(reader, writer)
            ready.set_result(None)
            await asyncio.wait_for(self._go.wait(), START_TIMEOUT + IO_TIMEOUT)
            data = bytearray()
            reading = asyncio.create_task(
                _read_until(reader, data, None, EXIT_TIMEOUT + IO_TIMEOUT)
            )
            try:
                for i in range(len(TRICKLE_BYTES)):
                    if reading.done():
                        break
                    try:
                        writer.write(TRICKLE_BYTES[i : i + 1])
                        await writer.drain()
                    except ConnectionError:
                        break
                    if not started.done():
                        started.set_result(None)
                    # the workload's pacing; it ends early when the server closes
                    await asyncio.wait({reading}, timeout=TRICKLE_EVERY)
                how = await reading
            finally:
                reading.cancel()
            closed = time.monotonic() if how in ("eof", "reset") else None
            outcome = f"{how} after {_describe(data)}" if data else f"closed: {how}, no response"
            return ClientResult("trickle", outcome, closed)
        finally:
            writer.close()

    async def _stream(self, ready: asyncio.Future[None]) -> ClientResult:
        reader, writer = await self._open()
        try:
            writer.write(_request("/events"))
            await writer.drain()
            status, _ = await asyncio.wait_for(_read_head(reader), START_TIMEOUT)
            data = bytearray()
            if status != 200 or await _read_until(reader, data, b"data: hello", IO_TIMEOUT) != (
                "found"
            ):
                raise BenchError(f"/events answered {status}, then {bytes(data)!r}")
            ready.set_result(None)
            how = await _read_until(reader, data, b"event: goodbye", EXIT_TIMEOUT + IO_TIMEOUT)
            if how != "found":
                closed = time.monotonic() if how in ("eof", "reset") else None
                return ClientResult("stream", f"no goodbye: {how}", closed, failed=True)
            end = await _read_until(reader, data, None, EXIT_TIMEOUT + IO_TIMEOUT)
            closed = time.monotonic() if end in ("eof", "reset") else None
            return ClientResult("stream", f"goodbye, then {end}", closed)
        finally:
            writer.close()

    async def _busy(self, tag: str) -> ClientResult:
        reader, writer = await self._open()
        try:
            writer.write(_request(f"/slow?tag={tag}"))
            await writer.drain()
            try:
                status, headers = await asyncio.wait_for(
                    _read_response(reader), EXIT_TIMEOUT + IO_TIMEOUT
                )
            except asyncio.IncompleteReadError:
                return ClientResult("busy", "no response: eof", time.monotonic(), failed=True)
            except ConnectionError:
                return ClientResult("busy", "no response: reset", time.monotonic(), failed=True)
            except TimeoutError:
                return ClientResult("busy", "no response: timeout", None, failed=True)
            answered = time.monotonic()
            if self.signalled is None or answered < self.signalled:
                return ClientResult("busy", "answered before the signal", None, failed=True)
            close = "Connection: close" if headers.get("connection") == "close" else "no close"
            end = await _read_until(reader, bytearray(), None, EXIT_TIMEOUT + IO_TIMEOUT)
            closed = time.monotonic() if end in ("eof", "reset") else None
            return ClientResult("busy", f"{status} ({close}), then {end}", closed, status != 200)
        finally:
            writer.close()


def _describe(data: bytearray) -> str:
    if data.startswith(b"HTTP/1."):
        return f"a {bytes(data[9:12]).decode(errors='replace')} response"
    return f"{len(data)} unexpected bytes"


async def _run_batch(slots: list[Slot], first: int, arrivals: Arrivals) -> list[Drain]:
    drains = [Drain(slot, first + i, arrivals) for i, slot in enumerate(slots)]
    try:
        for phase in (Drain.start, Drain.settle, Drain.fire, Drain.collect):
            async with asyncio.TaskGroup() as group:
                for drain in drains:
                    group.create_task(phase(drain))
    finally:
        for drain in drains:
            await drain.abort()
    return drains


def _pct(values: list[float], q: float) -> float:
    """The nearest-rank percentile ``q`` (0-100) of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _report(drains: list[Drain], per_server: int, batch: int, wall: float) -> str:
    lines = [
        f"{per_server} drains per server, in batches of {batch} per server "
        f"({2 * batch} processes side by side, the servers interleaved); "
        f"shutdown_timeout {SHUTDOWN_TIMEOUT:g} s for both; {wall:.0f} s in all",
        "clients per drain: "
        + ", ".join(f"{n} {kind}" for kind, n in MIX.items())
        + f" (busy: /slow, 300 ms; trickle: 1 byte every {TRICKLE_EVERY:g} s)",
        "sdserve: --workers 0, otherwise defaults (idle_grace 1 s, header_timeout 10 s, "
        "keepalive_timeout 15 s); aiohttp: web.run_app(handle_signals=True)",
        "",
        f"{'server':<8} {'drains':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'exit!=0':>7} {'busy fail':>9} {'stream fail':>11}",
    ]
    figures: dict[str, tuple[float, float]] = {}
    details: list[str] = []
    for server in SERVERS:
        mine = [d for d in drains if d.slot.server == server]
        times = [d.took for d in mine if d.status is not None]
        nonzero = Counter(d.status for d in mine if d.status != 0)
        fails = Counter(r.kind for d in mine for r in d.results if r.failed)
        if times:
            p50, p99 = _pct(times, 50), _pct(times, 99)
            figures[server] = (p50, p99)
            cells = f"{p50 * 1000:8.0f} {p99 * 1000:8.0f} {max(times) * 1000:8.0f}"
        else:
            cells = f"{'-':>8} {'-':>8} {'-':>8}"
        lines.append(
            f"{server:<8} {len(mine):>6} {cells} {sum(nonzero.values()):>7} "
            f"{fails['busy']:>9} {fails['stream']:>11}"
        )
        if nonzero:
            statuses = ", ".join(
                f"{s if s is not None else 'no exit'}: {n}" for s, n in nonzero.items()
            )
            details.append(f"{server} non-zero exits: {statuses}")
        for kind in MIX:
            outcomes = Counter(r.outcome for d in mine for r in d.results if r.kind == kind)
            after = [
                r.closed - d.signalled
                for d in mine
                for r in d.results
                if r.kind == kind and r.closed is not None and d.signalled is not None
            ]
            when = (
                f"; closed by the server at p50 {_pct(after, 50) * 1000:.0f} ms, "
                f"max {max(after) * 1000:.0f} ms after the signal"
                if after
                else ""
            )
            seen = ", ".join(f"{o}: {n}" for o, n in outcomes.most_common())
            details.append(f"{server} {kind:<7} {seen}{when}")
    if len(figures) == 2:
        (s50, s99), (a50, a99) = figures["sdserve"], figures["aiohttp"]
        lines.append(f"sdserve / aiohttp: p50 {s50 / a50:.2f}x, p99 {s99 / a99:.2f}x")
    return "\n".join([*lines, "", *details])


async def _main() -> str:
    per_server = int(os.environ.get("SDS_BENCH_DRAINS", "100"))
    batch = max(1, min(per_server, int(os.environ.get("SDS_BENCH_DRAIN_BATCH", "5"))))
    workdir = Path(tempfile.mkdtemp(prefix="sds-drain-"))
    arrivals = Arrivals(workdir / "arrivals.sock")
    env = {ARRIVALS_ENV: str(arrivals.path)}
    timeout = ["--shutdown-timeout", f"{SHUTDOWN_TIMEOUT:g}"]
    argv = {
        "sdserve": [
            *(sys.executable, "-m", "sdserve", "run", f"{APP}:create_app"),
            *("--workers", "0", "--log", "stderr", *timeout),
        ],
        # the launcher hands the socket over as fd 3, as it does to sdserve
        "aiohttp": [sys.executable, "-m", APP, "--fd", "3", *timeout],
    }
    slots: list[Slot] = []
    drains: list[Drain] = []
    began = time.monotonic()
    try:
        await arrivals.start()
        for server in SERVERS:
            for i in range(batch):
                sock = socket.create_server(("127.0.0.1", 0), backlog=128)
                slot_dir = workdir / f"{server}-{i}"
                slot_dir.mkdir()
                launcher = Launcher(
                    argv[server], [("http", sock)], workdir=slot_dir, env=env, cwd=ROOT
                )
                slots.append(Slot(server, launcher, sock))
        for first in range(0, per_server, batch):
            count = min(batch, per_server - first)
            chosen: list[Slot] = []
            for server in SERVERS:
                chosen += [s for s in slots if s.server == server][:count]
            drains += await _run_batch(chosen, first, arrivals)
    finally:
        for slot in slots:
            await slot.launcher.close()
            slot.sock.close()
        await arrivals.close()
        if os.environ.get("SDS_BENCH_KEEP"):
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return _report(drains, per_server, batch, time.monotonic() - began)


def main() -> str:
    return asyncio.run(_main())
