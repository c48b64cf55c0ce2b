"""Instructions per request: sdserve's request path against bare aiohttp, counted, not timed.

On a small shared machine a rate swings 25-50% between two runs of the same server
(``bench_throughput`` says so), which hides the few percent a request path costs. Here
each server runs under valgrind's callgrind, which counts the instructions it executes:
the same for the same code and inputs, whatever else the machine does. Instrumentation
is switched on (``callgrind_control``) only after the server serves and has answered a
warm-up, for a fixed number of hello-world requests over keep-alive connections, and off
again; the count is divided by the requests.

What it counts: user-space instructions of the server's process (the kernel's share of a
request, its system calls, is not in it: in the rate it weighs about a third on this
machine, and is the same for every row, so a ratio here is a little larger than the
same cost measured in the rate). Each row's ratio is to bare aiohttp ``run_app`` on the
same event loop, measured in the same run.

Rows: sdserve with one process (``--workers 0``) as it comes (metrics on), without
metrics, with admission control (its bookkeeping not engaged at this load), with trace
ids, with the access log at 100% (text lines to a file), on uvloop; and as it comes on
asyncio. Goals (issues 14 and 16): as it comes, at least 0.95 of bare aiohttp by
instructions; metrics at most 5% more than without; the access log at 100% (trace ids
included) at most 15% (by instructions a stricter test than the rate's, which counts the
kernel's share too). ``SDS_BENCH_IR_REQUESTS`` (default 2000) sets the requests counted.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REQUESTS = int(os.environ.get("SDS_BENCH_IR_REQUESTS", "2000"))
WARM = 400
CONNECTIONS = 8
START_TIMEOUT = 120.0
PY = sys.executable
#: under valgrind a request takes about 50 times as long: admission control's times are
#: scaled to match, so that it engages (or not), and times requests, as it would
#: uninstrumented at this load
SLOWED = (
    ("SDSERVE_OVERLOAD__QUEUE_TARGET", "250ms"),
    ("SDSERVE_OVERLOAD__QUEUE_INTERVAL", "5s"),
)
_REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")
_TOTAL = re.compile(r"([\d,]+) \(100\.0%\)\s+PROGRAM TOTALS")


@dataclass(frozen=True)
class Server:
    name: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    #: the row it is compared with
    base: str = ""


def _sdserve(
    loop: str, *env: tuple[str, str]
) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    argv: tuple[str, ...] = (PY, "-m", "sdserve", "run", "tests.bench.peers:create_app")
    argv += ("--bind", "127.0.0.1:{port}", "--workers", "0", "--loop", loop, "--log", "stderr")
    return argv, SLOWED + env


BARE_UV = "aiohttp run_app (uvloop)"
BARE_AS = "aiohttp run_app (asyncio)"
SERVERS = (
    Server(BARE_UV, (PY, "-m", "tests.bench.peers", "{port}", "uvloop")),
    Server("sdserve --workers 0 (uvloop)", *_sdserve("uvloop"), base=BARE_UV),
    Server("  without metrics", *_sdserve("uvloop", ("SDSERVE_METRICS", "false")), base=BARE_UV),
    Server(
        "  with admission control (not engaged)",
        *_sdserve("uvloop", ("SDSERVE_OVERLOAD__ENABLED", "true")),
        base=BARE_UV,
    ),
    Server("  with trace ids", *_sdserve("uvloop", ("SDSERVE_TRACE_IDS", "true")), base=BARE_UV),
    Server(
        "  with the access log (100%)",
        *_sdserve("uvloop", ("SDSERVE_ACCESS_LOG", "true")),
        base=BARE_UV,
    ),
    Server(BARE_AS, (PY, "-m", "tests.bench.peers", "{port}", "asyncio")),
    Server("sdserve --workers 0 (asyncio)", *_sdserve("asyncio"), base=BARE_AS),
)


async def _requests(port: int, count: int) -> None:
    """``count`` requests over CONNECTIONS keep-alive connections, each answer read whole."""

    async def one(n: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(n):
                writer.write(_REQUEST)
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"not a 200: {head[:60]!r}")
                found = _LENGTH.search(head)
                await reader.readexactly(int(found.group(1)) if found else 0)
        finally:
            writer.close()

    await asyncio.gather(*(one(count // CONNECTIONS) for _ in range(CONNECTIONS)))


async def _serving(port: int, proc: subprocess.Popen[bytes]) -> None:
    """Until one request is answered (a connection made early waits in the kernel queue)."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}) before serving")
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                await _requests(port, CONNECTIONS)
            return
        except (ConnectionError, OSError):
            await asyncio.sleep(0.2)  # not listening yet: a bounded retry, not a sync
    raise TimeoutError(f"not serving within {START_TIMEOUT:g} s")


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def _count(server: Server) -> float:
    """Instructions per request of ``server``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    out = Path(tempfile.mkdtemp(prefix="sds-ir-"))
    argv = [a.format(port=port) for a in server.argv]
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--dump-instr=no"]
    valgrind.append(f"--callgrind-out-file={out}/cg.%p")
    env = {**os.environ, **dict(server.env), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [*valgrind, *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        asyncio.run(_serving(port, proc))
        asyncio.run(_requests(port, WARM))
        _control(proc.pid, "-i", "on")
        asyncio.run(_requests(port, REQUESTS))
        _control(proc.pid, "-i", "off")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    total = 0
    for dump in out.glob("cg.*"):
        text = subprocess.run(
            ["callgrind_annotate", str(dump)], capture_output=True, text=True, check=True
        ).stdout
        if found := _TOTAL.search(text):
            total += int(found.group(1).replace(",", ""))
    shutil.rmtree(out, ignore_errors=True)
    if total == 0:
        raise RuntimeError(f"{server.name}: callgrind counted nothing")
    return total / REQUESTS


def main() -> str:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        return "valgrind is not installed (make apt): no instruction counts"
    counts = {server.name: _count(server) for server in SERVERS}
    lines = [
        f"user-space instructions per hello-world request under callgrind, {REQUESTS} "
        f"requests over {CONNECTIONS} keep-alive connections",
        "| server | instructions/request | vs bare aiohttp, same loop |",
        "|---|---|---|",
    ]
    for server in SERVERS:
        ir = counts[server.name]
        versus = f"{counts[server.base] / ir:.3f}" if server.base else "1.000"
        lines.append(f"| {server.name} | {ir:,.0f} | {versus} |")
    as_comes = counts["sdserve --workers 0 (uvloop)"]
    bare = counts[BARE_UV]
    without = counts["  without metrics"]
    lines.append("")
    for what, ratio, goal in (
        ("sdserve vs aiohttp run_app, uvloop", bare / as_comes, 0.95),
        (
            "sdserve vs aiohttp run_app, asyncio",
            counts[BARE_AS] / counts["sdserve --workers 0 (asyncio)"],
            0.95,
        ),
        ("metrics: sdserve without them vs with", without / as_comes, 0.95),
        (
            "access log 100%: sdserve without it vs with",
            as_comes / counts["  with the access log (100%)"],
            0.85,
        ),
    ):
        verdict = "met" if ratio >= goal else "NOT met"
        lines.append(f"{what}: {ratio:.3f} (goal >= {goal:.2f}: {verdict})")
    admission = counts["  with admission control (not engaged)"]
    lines.append(
        f"admission control, not engaged: {admission - as_comes:+,.0f} instructions a "
        f"request ({as_comes / admission:.3f} of sdserve as it comes)"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    print(main())
