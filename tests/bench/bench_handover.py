"""Keep-alive connections through reloads and restarts, handed over or drained, in one run.

Pooled keep-alive clients (16 connections, each sending at random moments, never
retrying) run through ``CYCLES`` reloads (supervisor, 2 workers) and ``CYCLES``
restarts (single process, the launcher playing systemd's fd store), once with the
hand-over (``handover = true`` and a store) and once as before it (``--no-handover``).
Reported: failed requests, connections the server closed, connections the clients had
to open, the worst request, and for restarts the gap (SIGTERM to the new READY=1) and
the start-up time of the new instance.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sdserve.launcher import Launcher
from tests.helpers import HOST, PoolStats, pooled_load, write_app

ROOT = Path(__file__).resolve().parents[2]
CYCLES = int(os.environ.get("SDS_BENCH_HANDOVER_CYCLES", "100"))
POOL = 16


def _line(what: str, stats: PoolStats, extra: str = "") -> str:
    return (
        f"  {what}: {stats.ok:,} requests, {stats.total_failed} failed, "
        f"{stats.closed_by_server} closed by the server, {stats.connections - POOL} "
        f"reconnect(s), worst {stats.longest * 1000:.0f} ms{extra}"
    )


async def _reloads(workdir: Path, handover: bool) -> PoolStats:
    sock = socket.create_server((HOST, 0), backlog=4096)
    port = sock.getsockname()[1]
    argv = [sys.executable, "-m", "sdserve", "run", "relapp:create_app", "--workers", "2"]
    argv += ["--warmup-parallel", "0", "--log", "stderr"]
    if not handover:
        argv.append("--no-handover")
    launcher = Launcher(argv, [("http", sock)], workdir=workdir, cwd=workdir)
    try:
        await launcher.start()
        async with pooled_load(HOST, port, connections=POOL) as stats:
            await stats.wait_ok(200, 10)
            for _ in range(CYCLES):
                seen = set(stats.pids)
                await launcher.reload(timeout=30)
                # the new generation answers (drained, the reconnects may all reach one
                # worker: it accepts them in one batch), then some more
                async with asyncio.timeout(30):
                    while not set(stats.pids) - seen:
                        await stats.wait_ok(stats.ok + 1, 30)
                await stats.wait_ok(stats.ok + 200, 30)
        await launcher.stop()
    finally:
        await launcher.close()
        sock.close()
    return stats


async def _restarts(workdir: Path, handover: bool) -> tuple[PoolStats, list[float], list[float]]:
    sock = socket.create_server((HOST, 0), backlog=4096)
    port = sock.getsockname()[1]
    argv = [sys.executable, "-m", "sdserve", "run", "relapp:create_app", "--workers", "0"]
    argv += ["--log", "stderr"]
    launcher = Launcher(
        argv,
        [("http", sock)],
        workdir=workdir,
        cwd=workdir,
        fd_store_max=256 if handover else 0,
    )
    gaps, startups = [], []
    try:
        await launcher.start()
        async with pooled_load(HOST, port, connections=POOL) as stats:
            await stats.wait_ok(200, 10)
            for _ in range(CYCLES):
                stopped = time.monotonic()
                instance = await launcher.restart(timeout=30)
                assert instance.ready is not None
                gaps.append(instance.ready - stopped)
                startups.append(instance.ready - instance.started)
                await stats.wait_ok(stats.ok + 50, 30)
        await launcher.stop()
    finally:
        await launcher.close()
        sock.close()
    return stats, gaps, startups


async def _main() -> str:
    workdir = Path(tempfile.mkdtemp(prefix="sds-bench-handover-"))
    write_app(workdir, "v1")
    lines = [f"{CYCLES} reloads (2 workers) and {CYCLES} restarts, {POOL} pooled connections:"]
    results = {}
    for handover in (False, True):
        label = "handed over" if handover else "drained (before)"
        reloads = await _reloads(workdir, handover)
        restarts, gaps, startups = await _restarts(workdir, handover)
        results[handover] = (reloads, restarts)
        lines.append(f"{label}:")
        lines.append(_line("reloads", reloads))
        lines.append(
            _line(
                "restarts",
                restarts,
                f"; gap median {statistics.median(gaps) * 1000:.0f} ms, max "
                f"{max(gaps) * 1000:.0f} ms; start-up median "
                f"{statistics.median(startups) * 1000:.0f} ms, max {max(startups) * 1000:.0f} ms",
            )
        )
    before, after = results[False][1], results[True][1]
    lines.append(
        f"restart worst request, handed over / drained: "
        f"{after.longest / max(before.longest, 1e-9):.2f}x"
    )
    return "\n".join(lines)


def main() -> str:
    return asyncio.run(_main())
