"""Start and stop figures of the core daemon, through the launcher (systemd's part played).

- the time from the last check passing to READY=1 (sdserve logs it at each start);
- SIGTERM to exit with nothing in flight, and with one 2 s request in flight (the
  request is held on a gate and released 2 s after the signal, so the figure minus
  2 s is the drain's own cost);
- failed requests over 20 stop/start cycles under load, by client kind.
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sdserve.launcher import Launcher
from tests.helpers import Gate, get, load

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.apps.controlled:create_app"
RUNS = 10


def _ms(values: list[float]) -> str:
    return (
        f"median {statistics.median(values) * 1000:.1f} ms, "
        f"min {min(values) * 1000:.1f}, max {max(values) * 1000:.1f}"
    )


async def _main() -> str:
    workdir = Path(tempfile.mkdtemp(prefix="sds-bench-"))
    gate = Gate(workdir / "gate.sock")
    await gate.start()
    lines = []
    for workers in (0, 2):
        sock = socket.create_server(("127.0.0.1", 0), backlog=4096)
        port = sock.getsockname()[1]
        flag = workdir / "up"
        flag.touch()
        argv = [sys.executable, "-m", "sdserve", "run", APP, "--workers", str(workers)]
        launcher = Launcher(
            [*argv, "--log", "stderr"],
            [("http", sock)],
            workdir=workdir,
            env={"TESTAPP_GATE": str(gate.path), "TESTAPP_READY_FILE": str(flag)},
            cwd=ROOT,
        )
        mode = "single process" if workers == 0 else f"supervisor + {workers} workers"
        try:
            lags, idle, busy = [], [], []
            for _ in range(RUNS):
                instance = await launcher.start()
                began = time.monotonic()
                await launcher.stop()
                idle.append(time.monotonic() - began)
                # logged just after READY=1, so read once the process has exited
                found = re.findall(r"checks passed ([0-9.]+) ms before", instance.log_text())
                lags += [float(m) / 1000 for m in found]
            for i in range(RUNS):
                await launcher.start()
                held = asyncio.create_task(get("127.0.0.1", port, f"/hold/r{i}", timeout=30))
                await gate.wait_held(f"r{i}")
                began = time.monotonic()
                launcher.send_signal(signal.SIGTERM)
                asyncio.get_running_loop().call_later(2.0, gate.release, f"r{i}")
                code = await launcher.stop()
                busy.append(time.monotonic() - began)
                assert code == 0
                assert (await held).status == 200
            lines.append(f"{mode}:")
            lines.append(f"  last check passing -> READY=1: {_ms(lags)} ({len(lags)} starts)")
            lines.append(f"  SIGTERM -> exit, nothing in flight: {_ms(idle)}")
            lines.append(f"  SIGTERM -> exit, a 2 s request in flight: {_ms(busy)}")
            await launcher.start()
            async with load("127.0.0.1", port, keepalive=8, newconn=8) as stats:
                for _ in range(20):
                    before = stats.total_ok
                    await launcher.restart()
                    await stats.wait_ok(before + 50, timeout=30)
            await launcher.stop()
            lines.append(
                f"  20 stop/start cycles under load: ok {dict(stats.ok)}, "
                f"failed {dict(stats.failed) or 'none'}, longest {stats.longest * 1000:.0f} ms"
            )
        finally:
            await launcher.close()
            sock.close()
    await gate.close()
    return "\n".join(lines)


def main() -> str:
    return asyncio.run(_main())
