"""``make demo``: drill the demo service through 10 reloads and 10 restarts.

Outside systemd, :class:`sdserve.launcher.Launcher` plays systemd's part: it holds the
listening socket (connections made while no instance accepts wait in its queue) and
starts ``sdserve run sdserve.demo:create_app`` with it, as a ``.socket`` unit would.

The load: open loop at ``DRILL_DEMO_RATE`` requests per second (600), half on
keep-alive connections and half on a new connection each, 1 in 10 to ``/slow``,
plus WebSocket clients echoing every half second.  The summary goes to the
terminal, the report to ``report/demo.html`` and ``report/demo.json``.

Reloads need the daemon to handle SIGHUP; until it does (an uncaught SIGHUP would
kill it) they are skipped and reported as unsupported.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from sdserve.drill.actions import Action, ActionError, Schedule
from sdserve.drill.cli import write_outputs
from sdserve.drill.runner import run_drill
from sdserve.drill.spec import DrillSpec, Target
from sdserve.drill.text import render_text

RELOADS = 10
RESTARTS = 10
LEAD_IN = 4.0


def spacing(took: float, least: float) -> tuple[float, float]:
    """How often to act and the least gap after a run, given how long one run took.

    A restart is stop-then-start (one to a few seconds here); the service gets at
    least as long again to serve the queue before the next one.
    """
    gap = max(1.0, took)
    return max(least, took + gap + 0.5), gap


def catches_sighup(pid: int) -> bool:
    """Whether the process has a handler for SIGHUP (its SigCgt mask, from /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (1 - 1)))
    return False


def report_dir() -> Path:
    """``report/`` at the repository root (git-ignored), else in the current directory."""
    root = Path(__file__).resolve().parents[2]
    base = root if (root / "pyproject.toml").exists() else Path.cwd()
    return Path(os.environ.get("DRILL_DEMO_REPORT", base / "report"))


async def demo() -> int:
    from sdserve.launcher import Launcher, LaunchError

    rate = float(os.environ.get("DRILL_DEMO_RATE", "600"))
    sock = socket.create_server(("127.0.0.1", 0), backlog=4096)
    port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "sdserve", "run", "sdserve.demo:create_app", "--log", "stderr"]
    with tempfile.TemporaryDirectory(prefix="sdserve-demo-") as tmp:
        # with an fd store, as the shipped units have: restarts hand idle connections over
        launcher = Launcher(argv, [("http", sock)], workdir=Path(tmp), fd_store_max=4096)
        try:
            await launcher.start()
            pid = launcher.pid
            assert pid is not None
            reload_ok = catches_sighup(pid)

            async def restart() -> str:
                old = launcher.pid
                await launcher.restart()
                return f"pid {old} -> {launcher.pid}"

            async def reload() -> str:
                took = await launcher.reload()
                return f"pid {launcher.pid}, {took:.2f} s"

            async def target_pid() -> int | None:
                return launcher.pid

            # One of each first, outside the drill, to learn how long they take here.
            began = time.monotonic()
            await launcher.restart()
            restart_every, restart_gap = spacing(time.monotonic() - began, 3.0)
            actions = []
            start = LEAD_IN
            if reload_ok:
                reload_every, reload_gap = spacing(await launcher.reload(), 2.0)
                schedule = Schedule(RELOADS, reload_every, start, min_gap=reload_gap)
                actions.append(Action("reload", reload, schedule, group="unit"))
                start += RELOADS * reload_every
            schedule = Schedule(RESTARTS, restart_every, start, min_gap=restart_gap)
            actions.append(Action("restart", restart, schedule, group="unit"))
            # room at the end in case slow runs push the later ones back
            duration = start + RESTARTS * restart_every * 1.3 + LEAD_IN / 2
            spec = DrillSpec(
                targets=(Target(f"{base}/", 9), Target(f"{base}/slow?ms=50", 1)),
                duration=duration,
                rate=rate,
                keepalive=0.5,
                timeout=10.0,
                ws_url=f"ws://127.0.0.1:{port}/ws",
                ws_clients=8,
                after_window=1.0,
            )
            print(
                f"drilling the demo service on {base} for {duration:.0f} s: "
                f"{RELOADS if reload_ok else 0} reloads, {RESTARTS} restarts",
                file=sys.stderr,
            )
            if sys.stderr.isatty():
                from sdserve.drill.live import LiveProgress

                with LiveProgress() as live:
                    result = await run_drill(
                        spec, actions, pid_source=target_pid, on_progress=live.update
                    )
            else:
                result = await run_drill(spec, actions, pid_source=target_pid)
        except (ActionError, LaunchError) as exc:
            print(f"demo: {exc}", file=sys.stderr)
            return 3
        finally:
            await launcher.close()
            sock.close()
    doc = result.to_json()
    if not reload_ok:
        doc["errors"].append(
            "reloads skipped: the daemon does not handle SIGHUP yet (reload is unsupported)"
        )
    sys.stdout.write(render_text(doc))
    out = report_dir()
    for line in write_outputs(doc, out / "demo.json", out / "demo.html"):
        print(line)
    failed_actions = [a for a in result.actions if not a.ok]
    if failed_actions or result.errors:
        return 3
    # The demo shows; it is no deploy gate (``sdserve drill --max-failures`` is): a run
    # that completed exits 0, and any lost request is reported above and here.
    lost = doc["phases"]["overall"]["failures"]
    if lost:
        print(
            f"demo: {lost} request(s) failed; the report shows when (see the README on the "
            "race left when an idle keep-alive connection is closed)",
            file=sys.stderr,
        )
    return 0


def main() -> None:
    sys.exit(asyncio.run(demo()))


if __name__ == "__main__":
    main()
