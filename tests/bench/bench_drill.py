"""The drill's maximum request rate against wrk's, same target, same run.

Both run closed loop with the same number of keep-alive connections against
:mod:`tests.bench.target` (a fast uvloop server, so the clients are what is
measured), wrk with as many threads as the drill has processes.  They alternate for
a few rounds and each keeps its best rate, so that other work on the machine skews
neither side.  The goal is a ratio of at least 0.5.  This reports; it does not assert.
"""

from __future__ import annotations

import asyncio
import os
import select
import shutil
import signal
import subprocess
import sys

from sdserve.drill import DrillSpec, Target, run_drill
from tests.bench.wrk import run_wrk

DURATION = float(os.environ.get("BENCH_DURATION", "3"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
CONNECTIONS = 32


def start_target() -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.target"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"benchmark target did not start: {line!r}")
    return proc, int(line.split()[1])


def wrk_rate(url: str, threads: int) -> float:
    return run_wrk(url, connections=CONNECTIONS, duration=DURATION, threads=threads).rate


def drill_rate(url: str, processes: int) -> tuple[float, int]:
    spec = DrillSpec(
        targets=(Target(url),),
        duration=DURATION,
        concurrency=CONNECTIONS,
        keepalive=1.0,
        processes=processes,
    )
    result = asyncio.run(run_drill(spec))
    return result.requests / result.duration, result.failures


def main() -> str:
    if shutil.which("wrk") is None:
        return "wrk is not installed (Debian package wrk): skipped"
    proc, port = start_target()
    url = f"http://127.0.0.1:{port}/"
    lines = [
        f"closed loop, {CONNECTIONS} keep-alive connections, best of {ROUNDS} runs of "
        f"{DURATION:g} s, target tests.bench.target, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}",
        f"{'clients':<26}{'req/s':>12}{'ratio':>9}",
    ]
    try:
        for n in (1, 2):
            wrk = drill = 0.0
            failures = 0
            for _ in range(ROUNDS):
                wrk = max(wrk, wrk_rate(url, n))
                rate, failed = drill_rate(url, n)
                drill = max(drill, rate)
                failures += failed
            lines.append(f"{f'wrk -t{n}':<26}{wrk:>12,.0f}")
            lines.append(
                f"{f'sdserve drill -p {n}':<26}{drill:>12,.0f}{drill / wrk:>9.2f}"
                + (f"  ({failures} failures!)" if failures else "")
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    lines.append("goal: ratio >= 0.5")
    return "\n".join(lines)
