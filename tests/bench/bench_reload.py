"""Latency through reloads and restarts, as ratios to steady state, and throughput per worker count.

The demo app runs under the supervisor, behind a launcher that holds the socket
(as systemd does). The drill sends an open-loop load (latency counted from the
intended send time, so a stall cannot hide) and runs the action on a schedule;
its "during" phase covers each action, "steady" the time away from them. Each
ratio is p99 during the actions over steady p99, measured in the same run.

The launcher keeps a file descriptor store as the shipped units ask systemd to
(``FileDescriptorStoreMax=4096``): a restart puts the idle keep-alive connections there
for the next instance. A last row restarts without it, as a unit without the store
does: idle connections are then closed as the drain starts, and a client that reuses
one at that moment sees it closed (HTTP's keep-alive race; a client retries it).
"""

from __future__ import annotations

import asyncio
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

from sdserve.drill import Action, DrillSpec, Schedule, Target, run_drill
from sdserve.drill.result import DrillResult
from sdserve.launcher import Launcher
from tests.bench.procstat import cost, tree

RATE = 800.0
ACTIONS = 10
EVERY = 3.0
START = 3.0


def _p99(result: DrillResult, phase: str) -> float:
    value = result.phases()[phase]["latency_ms"]["p99"]  # type: ignore[literal-required]
    return float(value) if value is not None else float("nan")


#: the same span for every row: "during" lasts as long as the action, so a quick reload's
#: p99 is the worst few requests of a tenth of a second, a slow one's of most of a second
WINDOW = 1.5


def _p99_window(result: DrillResult) -> float:
    """p99 of the requests sent within WINDOW seconds of an action's start."""
    mask = np.zeros(result.start.size, dtype=bool)
    for action in result.actions:
        mask |= (result.start >= action.start) & (result.start <= action.start + WINDOW)
    value = result.percentiles(mask)["p99"]
    return float(value) if value is not None else float("nan")


#: the shipped units' FileDescriptorStoreMax=: a restart keeps idle connections in the store
FD_STORE = 4096


async def _with_service(
    workers: int,
    body: Callable[[Launcher, int], Awaitable[str]],
    *,
    template: bool = False,
    fd_store: int = FD_STORE,
) -> str:
    sock = socket.create_server(("127.0.0.1", 0), backlog=4096)
    port = sock.getsockname()[1]
    workdir = Path(tempfile.mkdtemp(prefix="sds-bench-"))
    argv = [sys.executable, "-m", "sdserve", "run", "sdserve.demo:create_app"]
    argv += ["--workers", str(workers), "--log", "stderr"]
    argv.append("--warm-template" if template else "--no-warm-template")
    launcher = Launcher(argv, [("http", sock)], workdir=workdir, fd_store_max=fd_store)
    try:
        await launcher.start()
        return await body(launcher, port)
    finally:
        await launcher.close()
        sock.close()


#: what any process start costs the workers serving here: a worker's imports, nothing else
_SPAWN = "import aiohttp.web, sdserve.worker"


async def _drill_through(
    kind: str, template: bool = False, fd_store: int = FD_STORE
) -> tuple[DrillResult, list[float]]:
    took: list[float] = []

    async def body(launcher: Launcher, port: int) -> str:
        async def act() -> str:
            began = time.monotonic()
            if kind == "reload":
                await launcher.reload(timeout=60)
            elif kind == "restart":
                await launcher.restart(timeout=60)
            elif kind == "spawn":
                proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _SPAWN)
                await proc.wait()
            else:  # "nothing": the phases' own bias, if any
                await asyncio.sleep(0.6)
            took.append(time.monotonic() - began)
            return f"{kind} in {took[-1]:.2f}s"

        spec = DrillSpec(
            targets=(Target(f"http://127.0.0.1:{port}/"),),
            duration=START + ACTIONS * EVERY + 2,
            rate=RATE,
            keepalive=0.5,
            processes=1,
            after_window=1.0,
        )
        result = await run_drill(spec, [Action(kind, act, Schedule(ACTIONS, EVERY, START))])
        results.append(result)
        return ""

    results: list[DrillResult] = []
    await _with_service(2, body, template=template, fd_store=fd_store)
    return results[0], took


async def _throughput(workers: int) -> float:
    rates: list[float] = []

    async def body(launcher: Launcher, port: int) -> str:
        spec = DrillSpec(
            targets=(Target(f"http://127.0.0.1:{port}/"),),
            duration=8.0,
            concurrency=64,
            keepalive=1.0,
            processes=1,
        )
        result = await run_drill(spec, [])
        rates.append(result.requests / result.duration)
        return ""

    await _with_service(workers, body)
    return rates[0]


RELOADS = 5


async def _reload_cost(workers: int = 2, *, template: bool = False) -> str:
    """What starting one worker of a reload costs: its CPU time and page faults up to the
    end of the reload, with no load (so nothing but its start is counted). With the warm
    template, the first reload may come before it is ready (its workers exec): one
    reload is made before the counted ones."""
    costs: list[tuple[float, int, int]] = []

    async def body(launcher: Launcher, port: int) -> str:
        supervisor = launcher.pid
        assert supervisor is not None
        if template:
            await launcher.reload(timeout=60)
        for _ in range(RELOADS):
            before = set(tree(supervisor)[1:])
            await launcher.reload(timeout=60)
            for pid in set(tree(supervisor)[1:]) - before:
                costs.append(cost(pid))
        return ""

    await _with_service(workers, body, template=template)
    n = len(costs)
    cpu = sorted(c[0] for c in costs)
    minor = sorted(c[1] for c in costs)
    major = sorted(c[2] for c in costs)
    how = "forked from the warm template" if template else "fork and exec"
    return (
        f"reload cost per new worker, {how} ({n} workers over {RELOADS} reloads, no load): "
        f"CPU {cpu[n // 2] * 1000:.0f} ms (median; {cpu[0] * 1000:.0f}-{cpu[-1] * 1000:.0f}), "
        f"minor page faults {minor[n // 2]:,} ({minor[0]:,}-{minor[-1]:,}), "
        f"major {major[n // 2]} ({major[0]}-{major[-1]})"
    )


async def _main() -> str:
    lines = [f"open-loop {RATE:.0f} req/s, half keep-alive, {ACTIONS} actions every {EVERY:g}s"]
    lines.append(
        "controls: 'nothing' waits 0.6 s (the phases' own bias); 'spawn' starts one Python "
        "process that imports what a worker imports (what any process start costs here)"
    )
    for kind, template, store in (
        ("nothing", False, FD_STORE),
        ("spawn", False, FD_STORE),
        ("reload", False, FD_STORE),
        ("reload", True, FD_STORE),
        ("restart", False, FD_STORE),
        ("restart", False, 0),
    ):
        result, took = await _drill_through(kind, template, store)
        steady, during = _p99(result, "steady"), _p99(result, "during")
        window = _p99_window(result)
        counts = result.phases()["overall"]
        name = f"{kind} (warm template)" if template else kind
        name = name if store else f"{name} (no fd store)"
        lines.append(
            f"{name:>24}: requests {counts['requests']}, failures {counts['failures']} "
            f"{dict(counts['classes'])}; p99 steady {steady:.1f} ms, during {during:.1f} ms, "
            f"ratio {during / steady:.2f}{' (goal <= 1.5)' if kind == 'reload' else ''}, "
            f"in the {WINDOW:g} s from its start {window:.1f} ms, ratio {window / steady:.2f}; "
            f"{kind} took {min(took):.2f}-{max(took):.2f}s"
        )
    lines.append(await _reload_cost())
    lines.append(await _reload_cost(template=True))
    one, two = await _throughput(1), await _throughput(2)
    lines.append(
        f"throughput (closed loop, 64 keep-alive clients, the drill on the same 2 cores): "
        f"1 worker {one:.0f} req/s, 2 workers {two:.0f} req/s, ratio {two / one:.2f}"
    )
    return "\n".join(lines)


def main() -> str:
    return asyncio.run(_main())
