"""Actions run on their schedule, do what they say, and shape the phases."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest

from sdserve.drill import (
    Action,
    DrillSpec,
    Schedule,
    Target,
    command,
    const_pid,
    kill_worker,
    pid_from_file,
    run_drill,
    send_signal,
)
from sdserve.drill.outcome import classify
from tests.drill.helpers import SIGNAL_COUNTER, WORKER_PARENT, finish, read_line, spawn_python
from tests.drill.servers import FaultyServer

StartServer = Callable[..., FaultyServer]


def light_load(url: str, duration: float = 1.5) -> DrillSpec:
    return DrillSpec(targets=(Target(url),), duration=duration, rate=100, processes=1)


@pytest.mark.asyncio
async def test_async_callable_runs_on_schedule(faulty: StartServer) -> None:
    server = faulty("none")
    calls: list[float] = []

    async def act() -> str:
        calls.append(time.monotonic())
        return "called"

    schedule = Schedule(times=3, every=0.3, start=0.2)
    result = await run_drill(light_load(server.url), [Action("probe", act, schedule)])
    server.stop()
    assert len(calls) == 3
    assert [r.number for r in result.actions] == [1, 2, 3]
    for rec, at, called in zip(result.actions, schedule.moments(), calls, strict=True):
        assert rec.ok
        assert rec.detail == "called"
        assert called >= result.t0 + at  # never early
        assert rec.start <= called - result.t0 <= rec.end


@pytest.mark.asyncio
async def test_signal_to_pid_in_file(faulty: StartServer, tmp_path: Path) -> None:
    server = faulty("none")
    target = spawn_python(SIGNAL_COUNTER)
    try:
        assert read_line(target) == "ready"
        pidfile = tmp_path / "main.pid"
        pidfile.write_text(f"{target.pid}\n")
        sig = Action(
            "hup",
            send_signal(signal.SIGHUP, pid_from_file(pidfile)),
            Schedule(times=4, every=0.25, start=0.1),
        )
        result = await run_drill(light_load(server.url), [sig])
        assert all(r.ok for r in result.actions)
        target.send_signal(signal.SIGTERM)
        assert read_line(target) == "4"
    finally:
        finish(target)
        server.stop()


@pytest.mark.asyncio
async def test_kill_worker_kills_the_oldest_child(faulty: StartServer) -> None:
    server = faulty("none")
    parent = spawn_python(WORKER_PARENT)
    try:
        first, _second = (int(p) for p in read_line(parent).split())
        action = Action("kill", kill_worker(const_pid(parent.pid)), Schedule(1, 1, 0.3))
        spec = light_load(server.url, 1.0)
        result = await run_drill(spec, [action], pid_source=const_pid(parent.pid))
        assert result.actions[0].ok, result.actions[0].detail
        assert f"worker {first} " in result.actions[0].detail
        assert read_line(parent) == str(-signal.SIGKILL)
        assert parent.wait(timeout=20) == 0
        # the parent and its two children were sampled before the kill
        assert max(r.processes for r in result.resources) == 3
        assert all(r.fds > 0 for r in result.resources if r.t < 0.3)
    finally:
        finish(parent)
        server.stop()


@pytest.mark.asyncio
async def test_failing_command_is_recorded(faulty: StartServer, tmp_path: Path) -> None:
    server = faulty("none")
    marker = tmp_path / "ran"
    bad = Action("bad", command("sh -c 'exit 7'"), Schedule(1, 1, 0.2))
    good = Action("good", command("touch {path}", {"path": marker}), Schedule(1, 1, 0.2))
    result = await run_drill(light_load(server.url, 1.0), [bad, good])
    server.stop()
    recs = {r.name: r for r in result.actions}
    assert not recs["bad"].ok
    assert "exit status 7" in recs["bad"].detail
    assert recs["good"].ok
    assert marker.exists()


@pytest.mark.asyncio
async def test_outage_marks_the_during_phase(faulty: StartServer, tmp_path: Path) -> None:
    """A dependency outage (the server answers 503 meanwhile) lands in the right phase."""
    server = faulty("toggle", "--code", "503")
    pid = server.proc.pid
    hold = 0.4
    outage = Action(
        "outage",
        command(f"kill -USR1 {pid}"),
        Schedule(times=2, every=1.0, start=0.5),
        end=command(f"kill -USR2 {pid}"),
        hold=hold,
    )
    spec = DrillSpec(
        targets=(Target(server.url),), duration=2.5, rate=200, processes=1, after_window=0.5
    )
    result = await run_drill(spec, [outage])
    records = server.stop()
    assert len(result.actions) == 2
    assert all(a.ok and a.end - a.start >= hold for a in result.actions)
    phases = result.phases()
    # the drill counts exactly the 503s the server sent
    assert phases["overall"]["status_5xx"] == {"503": records["counts"]["503"]}
    assert records["counts"]["503"] >= 0.5 * 200 * hold * 2
    # none of them in the steady phase; each overlapped a window the server recorded
    assert phases["steady"]["failures"] == 0
    assert phases["during"]["status_5xx"]["503"] > 0
    bad = np.array([classify(int(c)) != "success" for c in result.code])
    sent = result.t0 + result.start
    done = sent + result.latency
    in_window = np.zeros(bad.size, dtype=bool)
    for begin, end in records["windows"]:
        in_window |= (sent <= end) & (done >= begin)
    assert np.all(in_window[bad])


@pytest.mark.asyncio
async def test_actions_of_one_group_never_overlap(faulty: StartServer) -> None:
    server = faulty("none")
    release = asyncio.Event()
    running: list[str] = []
    overlaps: list[list[str]] = []

    def slow(name: str) -> Callable[[], Awaitable[str]]:
        async def act() -> str:
            running.append(name)
            if len(running) > 1:
                overlaps.append(list(running))
            if name == "first":
                await asyncio.wait_for(release.wait(), 5)  # until "other" is due and waiting
            running.remove(name)
            return name

        return act

    async def trigger() -> str:
        release.set()
        return "released"

    same = Schedule(1, 1, 0.2)
    actions = [
        Action("first", slow("first"), same, group="unit"),
        Action("second", slow("second"), Schedule(1, 1, 0.3), group="unit"),
        Action("trigger", trigger, Schedule(1, 1, 0.5)),  # no group: runs meanwhile
    ]
    result = await run_drill(light_load(server.url), actions)
    server.stop()
    assert overlaps == []
    recs = {r.name: r for r in result.actions}
    assert all(r.ok for r in recs.values())
    assert recs["second"].start >= recs["first"].end
    assert recs["first"].end >= recs["trigger"].start


@pytest.mark.asyncio
async def test_min_gap_pushes_runs_back_and_late_runs_are_skipped(faulty: StartServer) -> None:
    server = faulty("none")

    async def slow() -> str:
        await asyncio.sleep(0.3)  # the action itself takes this long
        return "done"

    # every 0.1 s, but each run takes 0.3 s and the next waits 0.2 s more after it
    schedule = Schedule(times=5, every=0.1, start=0.1, min_gap=0.2)
    result = await run_drill(light_load(server.url, 1.0), [Action("slow", slow, schedule)])
    server.stop()
    runs = [r for r in result.actions if r.ok]
    skipped = [r for r in result.actions if not r.ok]
    assert len(runs) + len(skipped) == 5
    assert len(runs) == 2  # at 0.1 and about 0.6; the third could not start before 1.1 s
    assert runs[1].start >= runs[0].end + 0.2
    assert all(r.detail.startswith("skipped") for r in skipped)
