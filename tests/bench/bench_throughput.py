"""Hello-world throughput and memory of sdserve against the other ways to serve Python HTTP.

Every server answers the same 12-byte body (``tests/bench/peers.py``). Two tables, one run:

- **one worker, pinned**: the server's processes on CPU 0, wrk on CPU 1, 64 keep-alive
  connections. The request path alone decides it.
- **two workers, unpinned**: each server with 2 worker processes, wrk free to run anywhere.

Each row is req/s and its ratio to a baseline measured in the same run: aiohttp's own
``run_app`` on asyncio for one worker, gunicorn's aiohttp worker for two. Beside it, the
server's CPU time per request (all its processes; on a busy machine it moves less than the
rate does), and RSS from ``/proc`` after the load (per worker process, and the whole tree).
The servers bind their own port; a server is loaded once it has said it serves, after a
one-second warm-up.

One run of a server is noisy on a small shared machine (a swing of 25-50% between two runs
of the same server was seen, in either direction), so the servers take turns for
``SDS_BENCH_ROUNDS`` rounds (3 by default) and each row gives the best rate and the least
CPU per request of its rounds, with its lowest rate beside them: a goal is met only when it
holds by both the best rate and the least CPU per request.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.bench.procstat import cost, tree

DURATION = float(os.environ.get("SDS_BENCH_DURATION", "5"))
ROUNDS = max(1, int(os.environ.get("SDS_BENCH_ROUNDS", "3")))
WARMUP = 1.0
CONNECTIONS = 64
READY_TIMEOUT = 30.0
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Server:
    name: str
    #: the command, with {port} and {workers}
    argv: tuple[str, ...]
    #: a line of its output that says it serves
    ready: str
    #: sdserve with workers=0 is one process: it has no separate worker processes
    single: bool = False


PY = sys.executable
SDSERVE = (PY, "-m", "sdserve", "run", "tests.bench.peers:create_app", "--bind", "127.0.0.1:{port}")
SDSERVE_READY = r"ready: \d+ worker|sdserve\.worker\[\d+\]: ready after"
GUNICORN: tuple[str, ...] = (
    str(BIN / "gunicorn"),
    "tests.bench.peers:gunicorn_app",
    "-b",
    "127.0.0.1:{port}",
)
GUNICORN += ("-w", "{workers}", "--log-level", "info")
UVICORN: tuple[str, ...] = (
    str(BIN / "uvicorn"),
    "tests.bench.peers:asgi",
    "--port",
    "{port}",
    "--no-access-log",
)
UVICORN += ("--http", "httptools", "--loop", "uvloop", "--lifespan", "off")
GRANIAN: tuple[str, ...] = (
    str(BIN / "granian"),
    "--interface",
    "asgi",
    "--port",
    "{port}",
    "--no-access-log",
)
GRANIAN += ("--workers", "{workers}", "--runtime-threads", "1", "tests.bench.peers:asgi")


def servers(workers: int) -> list[Server]:
    """The rows of one table; aiohttp's ``run_app`` (one process) only in the first."""
    rows: list[Server] = []
    if workers == 1:
        for loop in ("asyncio", "uvloop"):
            rows.append(
                Server(
                    f"aiohttp run_app ({loop})",
                    (PY, "-m", "tests.bench.peers", "{port}", loop),
                    r"^serving",
                    single=True,
                )
            )
        for loop in ("asyncio", "uvloop"):
            rows.append(
                Server(
                    f"sdserve --workers 0 ({loop})",
                    (*SDSERVE, "--workers", "0", "--loop", loop),
                    SDSERVE_READY,
                    single=True,
                )
            )
    for loop in ("asyncio", "uvloop"):
        rows.append(
            Server(
                f"sdserve --workers {workers} ({loop})",
                (*SDSERVE, "--workers", "{workers}", "--loop", loop),
                SDSERVE_READY,
            )
        )
    rows.append(
        Server(
            "gunicorn + aiohttp worker",
            (*GUNICORN, "-k", "aiohttp.GunicornWebWorker"),
            r"Booting worker",
        )
    )
    rows.append(
        Server(
            "gunicorn + aiohttp uvloop worker",
            (*GUNICORN, "-k", "aiohttp.GunicornUVLoopWebWorker"),
            r"Booting worker",
        )
    )
    rows.append(
        Server(
            "uvicorn (httptools, uvloop)",
            (*UVICORN, "--workers", "{workers}"),
            r"Application startup complete|Started server process",
        )
    )
    rows.append(Server("granian (Rust)", GRANIAN, r"Started worker"))
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(proc: subprocess.Popen[bytes], pattern: str, timeout: float) -> None:
    """Read the server's output until a line matches ``pattern`` (or it exits, or time runs out)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    buffer = b""
    fd = proc.stdout.fileno()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no line matching {pattern!r} in {timeout:g}s: {seen[-5:]}")
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            raise RuntimeError(f"exited ({proc.wait()}) before serving: {seen[-10:]}")
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace")
            seen.append(line)
            if re.search(pattern, line):
                return


def _drain_output(proc: subprocess.Popen[bytes]) -> None:
    """Keep reading the server's output in the background so a full pipe never blocks it."""
    import threading

    assert proc.stdout is not None
    stream = proc.stdout
    threading.Thread(target=stream.read, daemon=True).start()


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


_REQS = re.compile(r"Requests/sec:\s+([\d.]+)")
_TOTAL = re.compile(r"(\d+) requests in")


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of ``pids`` so far."""
    return sum(cost(pid)[0] for pid in pids)


def _wrk(port: int, seconds: float, pinned: bool) -> tuple[float, int]:
    argv = ["wrk", "-t", "1" if pinned else "2", "-c", str(CONNECTIONS), "-d", f"{seconds:g}s"]
    argv.append(f"http://127.0.0.1:{port}/")
    if pinned:
        argv = ["taskset", "-c", "1", *argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=True)
    match = _REQS.search(out.stdout)
    if not match:
        raise RuntimeError(f"wrk printed no rate: {out.stdout}{out.stderr}")
    if "Non-2xx" in out.stdout or "Socket errors" in out.stdout:
        raise RuntimeError(f"wrk saw errors: {out.stdout}")
    total = _TOTAL.search(out.stdout)
    return float(match.group(1)), int(total.group(1)) if total else 0


@dataclass(frozen=True)
class Row:
    name: str
    rate: float
    #: the server's CPU time per request (all its processes): less moved by a busy
    #: machine than the rate is
    cpu_us: float
    worker_rss_mib: float
    total_rss_mib: float
    #: the lowest rate of its rounds (the best is :attr:`rate`); one run's own rate
    low: float


def best_of(runs: list[Row]) -> Row:
    """One row for the rounds of a server: the best rate, the least CPU per request, the
    median RSS, and the lowest rate."""
    rss = sorted(runs, key=lambda r: r.total_rss_mib)[len(runs) // 2]
    return Row(
        runs[0].name,
        max(r.rate for r in runs),
        min(r.cpu_us for r in runs),
        rss.worker_rss_mib,
        rss.total_rss_mib,
        low=min(r.rate for r in runs),
    )


def measure(server: Server, workers: int, pinned: bool) -> Row:
    port = _free_port()
    argv = [a.format(port=port, workers=workers) for a in server.argv]
    if pinned:
        argv = ["taskset", "-c", "0", *argv]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    try:
        _wait_for(proc, server.ready, READY_TIMEOUT)
        _drain_output(proc)
        _wrk(port, WARMUP, pinned)
        pids = tree(proc.pid)
        cpu = _cpu_seconds(pids)
        rate, count = _wrk(port, DURATION, pinned)
        cpu = _cpu_seconds(pids) - cpu
        pids = tree(proc.pid)
        if (
            pinned
            and pids[0] == proc.pid
            and Path(f"/proc/{proc.pid}/comm").read_text() == "taskset\n"
        ):
            pids = pids[1:]
        rss = {p: _rss_kib(p) for p in pids}
        # the worker processes: the leaves of the tree (a single process is its own worker)
        leaves = [p for p in pids if not tree(p)[1:]] if not server.single else pids[:1]
        per_worker = sum(rss[p] for p in leaves) / max(1, len(leaves)) / 1024
        cpu_us = cpu / max(1, count) * 1e6
        return Row(server.name, rate, cpu_us, per_worker, sum(rss.values()) / 1024, low=rate)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass


def table(workers: int, pinned: bool) -> tuple[str, dict[str, Row]]:
    runs: dict[str, list[Row]] = {}
    for _ in range(ROUNDS):  # the servers take turns, so no row gets only a busy moment
        for server in servers(workers):
            runs.setdefault(server.name, []).append(measure(server, workers, pinned))
    rows = {name: best_of(found) for name, found in runs.items()}
    # the baseline: aiohttp's own run_app; with 2 workers (run_app has none), gunicorn's
    # aiohttp worker, the usual way to run aiohttp in several processes
    base_name = "aiohttp run_app (asyncio)" if workers == 1 else "gunicorn + aiohttp worker"
    base = rows[base_name].rate
    how = "pinned: server on CPU 0, wrk on CPU 1" if pinned else "unpinned"
    head = (
        f"{workers} worker(s), {how}, {CONNECTIONS} keep-alive connections, best of {ROUNDS} "
        f"rounds of {DURATION:g} s, load average {os.getloadavg()[0]:.1f}"
    )
    vs = "bare aiohttp" if workers == 1 else "gunicorn + aiohttp"
    lines = [
        head,
        f"| server | req/s (best) | lowest | vs {vs} | CPU µs/req | CPU vs {vs} "
        "| RSS/worker MiB | RSS total MiB |",
    ]
    lines.append("|---|---|---|---|---|---|---|---|")
    base_cpu = rows[base_name].cpu_us
    for r in rows.values():
        lines.append(
            f"| {r.name} | {r.rate:,.0f} | {r.low:,.0f} | {r.rate / base:.2f} | {r.cpu_us:.1f} "
            f"| {r.cpu_us / base_cpu:.2f} | {r.worker_rss_mib:.1f} | {r.total_rss_mib:.1f} |"
        )
    return "\n".join(lines), rows


#: (what, sdserve's row, the peer's row, the goal ratio)
GOALS = (
    (
        "sdserve vs aiohttp run_app, asyncio",
        "sdserve --workers 0 (asyncio)",
        "aiohttp run_app (asyncio)",
        0.95,
    ),
    (
        "sdserve vs aiohttp run_app, uvloop",
        "sdserve --workers 0 (uvloop)",
        "aiohttp run_app (uvloop)",
        0.95,
    ),
    (
        "sdserve (1 worker) vs gunicorn's uvloop worker",
        "sdserve --workers 1 (uvloop)",
        "gunicorn + aiohttp uvloop worker",
        1.0,
    ),
    (
        "sdserve (1 worker) vs uvicorn (stretch)",
        "sdserve --workers 1 (uvloop)",
        "uvicorn (httptools, uvloop)",
        1.0,
    ),
)


def goals(rows: dict[str, Row]) -> str:
    lines = []
    for what, ours, theirs, goal in GOALS:
        ratio = rows[ours].rate / rows[theirs].rate
        # CPU per request: the peer's over ours, so that above 1 is better as for the rate
        cpu = rows[theirs].cpu_us / rows[ours].cpu_us
        mark = "met" if min(ratio, cpu) >= goal else "NOT met"
        lines.append(
            f"{what}: {ratio:.2f} by rate, {cpu:.2f} by CPU per request "
            f"(goal >= {goal:.2f}: {mark})"
        )
    return "\n".join(lines)


def main() -> str:
    one, rows = table(1, pinned=True)
    two, _ = table(2, pinned=False)
    return "\n\n".join([one, goals(rows), two])


if __name__ == "__main__":
    print(main())
