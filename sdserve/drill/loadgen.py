"""One load-generating process (``python -m sdserve.drill.loadgen``).

The drill starts several of these so that one Python process is not the bottleneck.
Each reads its share of the load as one JSON line on stdin, answers ``ready``, reads
the common start time (``time.monotonic()``, which is the same clock in every
process) as a second line, runs, and writes back every request it made.

Messages on stdout are framed: 4 bytes of length (big endian), then a pickle of a
dict with a ``type`` of ``ready``, ``progress`` or ``result``.  A closed stdin means
the parent is gone: the process stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pickle
import random
import resource
import struct
import sys
import time
from array import array
from typing import Any, BinaryIO

from sdserve.drill.client import (
    Endpoint,
    HttpConn,
    WsConn,
    open_socket,
    parse_target,
    transport_code,
)
from sdserve.drill.outcome import TIMEOUT

#: How often a process reports its running counts to the parent (seconds).
PROGRESS_EVERY = 0.25
#: How often timeouts are checked: a timed-out request is seen at most this late.
SWEEP_EVERY = 0.005


def write_message(out: BinaryIO, msg: dict[str, Any]) -> None:
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(struct.pack("!I", len(data)) + data)
    out.flush()


class Recorder:
    """Every request this process made, in compact arrays."""

    def __init__(self) -> None:
        self.start = array("d")  # intended send time, seconds since t0
        self.latency = array("d")  # seconds from the intended send time to the outcome
        self.code = array("h")  # see sdserve.drill.outcome
        self.target = array("h")  # index into the target list; -1 for WebSocket
        self.reused = array("b")  # 1: sent on a connection that carried an earlier request
        self.counts: dict[int, int] = {}
        self._counted = 0

    def add(self, start: float, latency: float, code: int, target: int, reused: int) -> None:
        self.start.append(start)
        self.latency.append(latency)
        self.code.append(code)
        self.target.append(target)
        self.reused.append(reused)

    def running_counts(self) -> dict[int, int]:
        """Requests by code so far (counting only what arrived since the last call)."""
        codes = self.code
        for code in codes[self._counted :]:
            self.counts[code] = self.counts.get(code, 0) + 1
        self._counted = len(codes)
        return dict(self.counts)


class LoadProcess:
    """The load of one process, as described by the spec the parent sent."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.endpoints: list[Endpoint] = [parse_target(t["url"]) for t in spec["targets"]]
        weights = [float(t["weight"]) for t in spec["targets"]]
        self.cycle = self._cycle(weights, int(spec.get("seed", 0)))
        self.timeout = float(spec["timeout"])
        self.duration = float(spec["duration"])
        self.keepalive = float(spec["keepalive"])
        self.max_idle = int(spec.get("max_idle", 32))
        self.rec = Recorder()
        self.pool: list[list[HttpConn]] = [[] for _ in self.endpoints]
        self.requests_ka = [ep.request_bytes(keepalive=True) for ep in self.endpoints]
        self.requests_close = [ep.request_bytes(keepalive=False) for ep in self.endpoints]
        self.inflight = 0
        self.not_sent = 0
        #: keep-alive connections opened, and those the server closed (a Connection:
        #: close response, or a close while the connection waited idle in the pool)
        self.ka_opened = 0
        self.ka_server_closed = 0
        self.ws_sessions = 0
        self.ws_clean_closes = 0
        self.ws_abnormal_closes = 0
        self.t0 = 0.0
        self.tasks: set[asyncio.Task[None]] = set()
        self.waiting: dict[HttpConn, float] = {}

    @staticmethod
    def _cycle(weights: list[float], seed: int) -> list[int]:
        """A shuffled list of target indexes in proportion to the weights."""
        if not weights:
            return []
        scale = 1000.0 / sum(weights)
        out: list[int] = []
        for i, w in enumerate(weights):
            out.extend([i] * max(1, round(w * scale)))
        random.Random(seed).shuffle(out)
        return out

    # one HTTP request ------------------------------------------------------------
    async def request(self, intended: float, target: int, keepalive: bool) -> None:
        """Send one request and record how it ended.  Never retries."""
        self.inflight += 1
        conn: HttpConn | None = None
        if keepalive:
            pool = self.pool[target]
            while pool:
                c = pool.pop()
                if not c.closed:
                    conn = c
                    break
                self.ka_server_closed += 1  # closed by the server while idle
        reused = 0 if conn is None else 1
        deadline = (intended if intended > self.t0 else self.t0) + self.timeout
        if conn is None:
            opened = await self._connect(target, deadline)
            if isinstance(opened, int):
                self._record(intended, opened, target, 0)
                return
            conn = opened
            if keepalive:
                self.ka_opened += 1
        fut = conn.send(self.requests_ka[target] if keepalive else self.requests_close[target])
        waiting = self.waiting
        waiting[conn] = deadline
        try:
            code = await fut
        finally:
            waiting.pop(conn, None)
        pool = self.pool[target]
        if keepalive and conn.reusable and not conn.closed and len(pool) < self.max_idle:
            pool.append(conn)
        else:
            if keepalive and code >= 100 and not conn.reusable:
                self.ka_server_closed += 1  # a complete response, and then it closed
            conn.close()
        self._record(intended, code, target, reused)

    def _record(self, intended: float, code: int, target: int, reused: int) -> None:
        self.inflight -= 1
        rec = self.rec
        rec.start.append(intended - self.t0)
        rec.latency.append(time.monotonic() - intended)
        rec.code.append(code)
        rec.target.append(target)
        rec.reused.append(reused)

    async def _connect(self, target: int, deadline: float) -> HttpConn | int:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                sock = await open_socket(self.endpoints[target])
                if isinstance(sock, int):
                    return sock
                _, conn = await loop.create_connection(HttpConn, sock=sock)
        except TimeoutError:
            return TIMEOUT
        except OSError as exc:
            return transport_code(exc)
        return conn

    async def _sweep(self) -> None:
        """Expire requests past their deadline (checked every SWEEP_EVERY seconds)."""
        for _ in range(int((self.duration + 2 * self.timeout + 10) / SWEEP_EVERY)):
            await asyncio.sleep(SWEEP_EVERY)
            now = time.monotonic()
            late = [c for c, d in self.waiting.items() if d <= now]
            for conn in late:
                self.waiting.pop(conn, None)
                conn.expire()

    # open loop ------------------------------------------------------------------------
    async def open_loop(self) -> None:
        rate = float(self.spec["rate"])
        if rate <= 0:
            return
        interval = 1.0 / rate
        first = self.t0 + float(self.spec.get("offset", 0.0))
        total = int(self.duration * rate)
        max_inflight = int(self.spec["max_inflight"])
        f = self.keepalive
        cycle = self.cycle
        loop = asyncio.get_running_loop()
        i = 0
        # Bounded: each turn either sends at least one request or sleeps at least 1 ms.
        for _ in range(total + 1000 * int(self.duration + 10)):
            if i >= total:
                break
            now = time.monotonic()
            due = first + i * interval
            if due > now:
                await asyncio.sleep(max(due - now, 0.001))
                continue
            while i < total and first + i * interval <= now:
                keep = int((i + 1) * f) > int(i * f)
                target = cycle[i % len(cycle)]
                if self.inflight >= max_inflight:
                    self.not_sent += 1
                else:
                    task = loop.create_task(self.request(first + i * interval, target, keep))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
                i += 1

    # closed loop ------------------------------------------------------------------------
    async def client(self, number: int, keepalive: bool) -> None:
        end = self.t0 + self.duration
        cycle = self.cycle
        n = len(cycle)
        max_requests = int(self.spec.get("max_requests", 10**9))
        for i in range(max_requests):
            now = time.monotonic()
            if now >= end:
                break
            await self.request(now, cycle[(number * 7919 + i) % n], keepalive)

    async def closed_loop(self) -> None:
        conc = int(self.spec["concurrency"])
        n_ka = round(conc * self.keepalive)
        await asyncio.gather(*(self.client(k, k < n_ka) for k in range(conc)))

    # WebSocket clients ----------------------------------------------------------------
    async def ws_client(self, number: int) -> None:
        ep = parse_target(self.spec["ws_url"])
        interval = float(self.spec["ws_interval"])
        end = self.t0 + self.duration
        loop = asyncio.get_running_loop()
        tick = self.t0 + (number % 10) * interval / 10
        max_turns = int(self.duration / interval) + 10
        conn: WsConn | None = None
        seq = 0
        for _ in range(2 * max_turns):
            if tick >= end:
                break
            delay = tick - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            intended = tick
            tick += interval
            if conn is None or conn.closed:
                if conn is not None:
                    self._ws_closed(conn)
                conn = None
                code, conn = await self._ws_open(ep, intended)
                self.rec.add(intended - self.t0, time.monotonic() - intended, code, -1, 0)
                continue
            seq += 1
            fut = conn.echo(f"drill {number} {seq}".encode())
            timer = loop.call_at(loop.time() + self.timeout, conn.expire)
            try:
                code = await fut
            finally:
                timer.cancel()
            self.rec.add(intended - self.t0, time.monotonic() - intended, code, -1, 1)
        if conn is not None:
            if not conn.closed:
                conn.close()
            else:
                self._ws_closed(conn)

    def _ws_closed(self, conn: WsConn) -> None:
        if conn.close_code is not None:
            self.ws_clean_closes += 1
        else:
            self.ws_abnormal_closes += 1

    async def _ws_open(self, ep: Endpoint, intended: float) -> tuple[int, WsConn | None]:
        loop = asyncio.get_running_loop()
        self.ws_sessions += 1
        try:
            async with asyncio.timeout(self.timeout):
                sock = await open_socket(ep)
                if isinstance(sock, int):
                    return sock, None
                _, conn = await loop.create_connection(lambda: WsConn(ep), sock=sock)
                code = await conn.handshake()
        except TimeoutError:
            return TIMEOUT, None
        if code != 101:
            conn.close()
            return code, None
        return code, conn

    # the whole run ----------------------------------------------------------------------
    async def run(self, t0: float, out: BinaryIO) -> dict[str, Any]:
        self.t0 = t0
        cpu_start = sum(os.times()[:2])
        delay = t0 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        progress = asyncio.get_running_loop().create_task(self._progress(out))
        sweep = asyncio.get_running_loop().create_task(self._sweep())
        jobs: list[Any] = []
        if self.endpoints:
            jobs.append(self.open_loop() if self.spec["mode"] == "open" else self.closed_loop())
        jobs.extend(self.ws_client(k) for k in range(int(self.spec.get("ws_clients", 0))))
        await asyncio.gather(*jobs)
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=self.timeout + 5)
        for task in (progress, sweep):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for pool in self.pool:
            for conn in pool:
                conn.close()
        rec = self.rec
        return {
            "type": "result",
            "start": rec.start.tobytes(),
            "latency": rec.latency.tobytes(),
            "code": rec.code.tobytes(),
            "target": rec.target.tobytes(),
            "reused": rec.reused.tobytes(),
            "not_sent": self.not_sent,
            "ka_opened": self.ka_opened,
            "ka_server_closed": self.ka_server_closed,
            "ws_sessions": self.ws_sessions,
            "ws_clean_closes": self.ws_clean_closes,
            "ws_abnormal_closes": self.ws_abnormal_closes,
            "cpu_s": sum(os.times()[:2]) - cpu_start,
        }

    async def _progress(self, out: BinaryIO) -> None:
        for _ in range(int((self.duration + self.timeout + 10) / PROGRESS_EVERY) + 1):
            await asyncio.sleep(PROGRESS_EVERY)
            msg = {
                "type": "progress",
                "counts": self.rec.running_counts(),
                "inflight": self.inflight,
            }
            write_message(out, msg)


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _main_async(out: BinaryIO) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    spec = json.loads(await reader.readline())
    proc = LoadProcess(spec)
    write_message(out, {"type": "ready", "pid": os.getpid()})
    start = await reader.readline()
    if not start:
        return
    t0 = float(json.loads(start)["t0"])
    run = loop.create_task(proc.run(t0, out))
    eof = loop.create_task(reader.read())  # the parent closes stdin only when it gives up
    done, _ = await asyncio.wait({run, eof}, return_when=asyncio.FIRST_COMPLETED)
    if run in done:
        write_message(out, run.result())
        eof.cancel()
    else:
        run.cancel()


def main() -> None:
    _raise_nofile()
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write into the message stream
    try:
        import uvloop
    except ImportError:
        asyncio.run(_main_async(out))
    else:
        uvloop.run(_main_async(out))


if __name__ == "__main__":
    main()
