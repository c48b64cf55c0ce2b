"""The throughput cost of metrics and access logs, as ratios to sdserve without them.

sdserve (one process, ``workers = 0``, the demo's ``/``) under wrk, closed loop, keep-alive
connections: without metrics or access log (the baseline), with metrics, with metrics and
the access log at 100% (to stderr, a file; and as JSON lines on stdout), and sampled at
10%. The variants alternate for a few rounds. Each keeps its best rate, and its ratio is
the median over the rounds of its rate to the baseline's in the same round, with each
round's ratio shown: a shared machine's speed drifts within minutes, which a ratio of two
runs a few seconds apart cancels better than a ratio of two best rates, and the spread of
the rounds says how far to trust the median. With two CPUs sdserve is pinned to one and
wrk to the other. Beside the rate, the CPU time sdserve's process spent per request (its
``utime + stime`` over the run, threads included: the access log's writer too). The goals
(issue 14): metrics at most 5%, the access log at 100% at most 15%, said met only when
both the rate and the CPU time a request meet them. bench_instructions counts the same
costs in instructions, which the machine's speed does not move (and which give a smaller
cost: the added Python code costs more time per instruction than the request path's
average). This reports; it does not assert.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import statistics
import sys
import tempfile
from pathlib import Path

from sdserve.launcher import Launcher
from tests.bench.wrk import run_wrk

DURATION = float(os.environ.get("BENCH_DURATION", "3"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
CONNECTIONS = 32

VARIANTS: dict[str, tuple[list[str], dict[str, str]]] = {
    "neither (baseline)": ([], {"SDSERVE_METRICS": "false"}),
    "metrics": ([], {}),
    "metrics + access log 100%": (["--access-log"], {}),
    "metrics + access log 10%": (["--access-log", "--access-log-sample", "0.1"], {}),
    "metrics + JSON access log 100%": (["--access-log", "--access-log-format", "json"], {}),
    "access log 100%, no metrics": (["--access-log"], {"SDSERVE_METRICS": "false"}),
}


def _pin(cpu: int) -> list[str]:
    if (os.cpu_count() or 1) >= 2 and shutil.which("taskset"):
        return ["taskset", "-c", str(cpu)]
    return []


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk_run(port: int) -> tuple[float, int]:
    """(requests a second, requests)"""
    run = run_wrk(
        f"http://127.0.0.1:{port}/", connections=CONNECTIONS, duration=DURATION, pin=_pin(1)
    )
    if run.non_2xx:
        raise RuntimeError(f"wrk saw {run.non_2xx} answers other than 2xx or 3xx")
    return run.rate, run.requests


async def one_round(name: str, workdir: Path) -> tuple[float, float]:
    """(requests a second, CPU microseconds a request)"""
    args, env = VARIANTS[name]
    sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
    argv = [*_pin(0), sys.executable, "-m", "sdserve", "run", "sdserve.demo:create_app"]
    argv += ["--workers", "0", "--log", "stderr", *args]
    launcher = Launcher(argv, [("http", sock)], workdir=workdir, env=env)
    try:
        instance = await launcher.start()
        before = cpu_seconds(instance.pid)
        rate, total = await asyncio.to_thread(wrk_run, sock.getsockname()[1])
        return rate, (cpu_seconds(instance.pid) - before) / total * 1e6
    finally:
        await launcher.stop()
        await launcher.close()
        sock.close()


async def measure() -> dict[str, list[tuple[float, float]]]:
    """Each variant's (rate, CPU per request) in each round, the baseline first."""
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="sds-bench-obs-") as tmp:
        for _ in range(ROUNDS):
            for name in VARIANTS:
                runs[name].append(await one_round(name, Path(tmp)))
    return runs


def main() -> str:
    if shutil.which("wrk") is None:
        return "wrk is not installed (Debian package wrk): skipped"
    runs = asyncio.run(measure())
    base = runs["neither (baseline)"]
    lines = [
        f"sdserve --workers 0, demo '/', wrk -t1 -c{CONNECTIONS}, {ROUNDS} rounds of "
        f"{DURATION:g} s runs, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
        "best: the best rate and least CPU per request of a variant's runs; ratio: the "
        "median over the rounds of the variant's to the baseline's in the same round",
        f"{'variant':<34}{'best req/s':>11}{'ratio':>7}{'CPU us/req':>12}{'ratio':>7}"
        f"{'ratios, by round':>34}",
    ]
    medians: dict[str, tuple[float, float]] = {}
    for name, own in runs.items():
        rates = [rate / b[0] for (rate, _), b in zip(own, base, strict=True)]
        cpus = [cpu / b[1] for (_, cpu), b in zip(own, base, strict=True)]
        medians[name] = (statistics.median(rates), statistics.median(cpus))
        spread = " ".join(f"{r:.2f}" for r in rates)
        lines.append(
            f"{name:<34}{max(r for r, _ in own):>11.0f}{medians[name][0]:>7.3f}"
            f"{min(c for _, c in own):>12.1f}{medians[name][1]:>7.3f}{spread:>34}"
        )
    # the goals, by the rate and by the CPU time a request (its inverse: the rate the
    # same CPU would serve), each against the baseline of its rounds
    for what, name, goal in (
        ("metrics", "metrics", 0.95),
        ("access log 100% (trace ids included)", "access log 100%, no metrics", 0.85),
    ):
        rate, cpu = medians[name]
        verdict = "met" if min(rate, 1 / cpu) >= goal else "NOT met"
        lines.append(
            f"{what}: {rate:.3f} of the baseline's rate, {1 / cpu:.3f} by CPU time a "
            f"request (goal >= {goal:.2f}: {verdict})"
        )
    return "\n".join(lines)
