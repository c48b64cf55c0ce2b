"""Run a drill: start the load processes, perform the actions, sample the target."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import pickle
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sdserve.drill.actions import Action, ActionRecord, PidSource
from sdserve.drill.resources import ResourceSample, sample
from sdserve.drill.result import DrillResult
from sdserve.drill.spec import DrillSpec

#: Time the load processes get to start and connect their pipes.
STARTUP_TIMEOUT = 30.0
#: How long before the common start time it is announced.
START_MARGIN = 0.2


@dataclass
class Progress:
    """What the drill knows while it runs (for a live display)."""

    elapsed: float = 0.0
    duration: float = 0.0
    counts: dict[int, int] = field(default_factory=dict)
    inflight: int = 0
    actions_done: int = 0
    actions_total: int = 0
    last_action: str = ""


ProgressFn = Callable[[Progress], None]


class DrillError(RuntimeError):
    """The drill itself could not run (a load process failed to start...)."""


async def _read_message(stream: asyncio.StreamReader) -> dict[str, Any] | None:
    try:
        head = await stream.readexactly(4)
        (n,) = struct.unpack("!I", head)
        data = await stream.readexactly(n)
    except asyncio.IncompleteReadError:
        return None
    msg: dict[str, Any] = pickle.loads(data)
    return msg


class _Loader:
    """One ``loadgen`` child process."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.counts: dict[int, int] = {}
        self.inflight = 0
        self.result: dict[str, Any] | None = None

    async def send(self, obj: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj).encode() + b"\n")
        await self.proc.stdin.drain()

    async def read(self) -> dict[str, Any] | None:
        assert self.proc.stdout is not None
        return await _read_message(self.proc.stdout)

    async def collect(self, on_progress: Callable[[], None]) -> None:
        """Read progress until the result arrives (bounded by the pipe closing)."""
        for _ in range(10**7):
            msg = await self.read()
            if msg is None:
                return
            if msg["type"] == "progress":
                self.counts = msg["counts"]
                self.inflight = msg["inflight"]
                on_progress()
            elif msg["type"] == "result":
                self.result = msg
                return

    async def stop(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 5.0)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


async def _spawn(share: dict[str, object]) -> _Loader:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sdserve.drill.loadgen",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        limit=2**20,
    )
    loader = _Loader(proc)
    await loader.send(share)
    return loader


async def _perform(
    action: Action, number: int, at: float, t0: float, lock: asyncio.Lock | None
) -> ActionRecord:
    delay = t0 + at - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    if lock is None:
        return await _perform_now(action, number, t0)
    async with lock:
        return await _perform_now(action, number, t0)


async def _perform_now(action: Action, number: int, t0: float) -> ActionRecord:
    begin = time.monotonic()
    ok = True
    details: list[str] = []
    try:
        details.append(str(await asyncio.wait_for(action.run(), action.timeout)))
        if action.end is not None:
            await asyncio.sleep(action.hold)
            details.append(str(await asyncio.wait_for(action.end(), action.timeout)))
    except Exception as exc:
        ok = False
        details.append(f"{type(exc).__name__}: {exc}")
    finish = time.monotonic()
    detail = "; ".join(d for d in details if d and d != "None")
    return ActionRecord(action.name, number, begin - t0, finish - t0, ok, detail[-1000:])


async def _run_action(
    action: Action,
    t0: float,
    records: list[ActionRecord],
    on_done: Callable[[str], None],
    *,
    lock: asyncio.Lock | None,
    until: float,
) -> None:
    """Each run of one action in turn: a slow run delays the next, never overlaps it.
    A run pushed back past the end of the load (``until``) is skipped and recorded so."""
    gap = action.schedule.min_gap
    previous_end: float | None = None
    for number, planned in enumerate(action.schedule.moments(), start=1):
        at = planned if previous_end is None else max(planned, previous_end + gap)
        if at >= until:
            detail = f"skipped: pushed back to {at:.1f} s, after the load ended"
            rec = ActionRecord(action.name, number, at, at, False, detail)
        else:
            rec = await _perform(action, number, at, t0, lock)
        previous_end = rec.end
        records.append(rec)
        on_done(f"{rec.name} #{rec.number} {'ok' if rec.ok else 'FAILED'}")


async def _sample_resources(
    pid_source: PidSource, t0: float, interval: float, until: float, out: list[ResourceSample]
) -> None:
    for k in range(int((until - t0) / interval) + 2):
        at = t0 + k * interval
        delay = at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if time.monotonic() > until:
            return
        pid = await pid_source()
        out.append(await asyncio.to_thread(sample, pid, time.monotonic() - t0))


async def run_drill(
    spec: DrillSpec,
    actions: Sequence[Action] = (),
    *,
    pid_source: PidSource | None = None,
    on_progress: ProgressFn | None = None,
) -> DrillResult:
    """Send the load described by ``spec`` while performing ``actions``; count everything.

    ``pid_source`` gives the target's PID whenever resources are sampled (it may change
    across restarts).  ``on_progress`` is called from the event loop a few times a second.
    """
    spec.validate()
    load_start = os.getloadavg()[0]
    for a in actions:
        for at in a.schedule.moments():
            if at >= spec.duration:
                raise ValueError(f"action {a.name!r} at {at:g} s is after the load ends")
    loaders: list[_Loader] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        for share in spec.shares():
            loaders.append(await _spawn(share))
        async with asyncio.timeout(STARTUP_TIMEOUT):
            for loader in loaders:
                msg = await loader.read()
                if msg is None or msg["type"] != "ready":
                    raise DrillError("a load process failed to start")
        t0 = time.monotonic() + START_MARGIN
        started_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=START_MARGIN)
        for loader in loaders:
            await loader.send({"t0": t0})

        records: list[ActionRecord] = []
        resources: list[ResourceSample] = []
        progress = Progress(
            duration=spec.duration,
            actions_total=sum(a.schedule.times for a in actions),
        )

        def report() -> None:
            if on_progress is None:
                return
            progress.elapsed = max(0.0, time.monotonic() - t0)
            counts: dict[int, int] = {}
            for ld in loaders:
                for k, v in ld.counts.items():
                    counts[k] = counts.get(k, 0) + v
            progress.counts = counts
            progress.inflight = sum(ld.inflight for ld in loaders)
            progress.actions_done = len(records)
            on_progress(progress)

        def action_done(text: str) -> None:
            progress.last_action = text
            report()

        loop = asyncio.get_running_loop()
        locks = {a.group: asyncio.Lock() for a in actions if a.group is not None}
        tasks = [
            loop.create_task(
                _run_action(
                    a,
                    t0,
                    records,
                    action_done,
                    lock=locks.get(a.group) if a.group else None,
                    until=spec.duration,
                )
            )
            for a in actions
        ]
        if pid_source is not None:
            until = t0 + spec.duration
            tasks.append(
                loop.create_task(
                    _sample_resources(pid_source, t0, spec.sample_interval, until, resources)
                )
            )
        bound = spec.duration + spec.timeout + START_MARGIN + 30
        async with asyncio.timeout(bound):
            await asyncio.gather(*(ld.collect(report) for ld in loaders))
        errors = [
            f"load process {ld.proc.pid} ended without a result"
            for ld in loaders
            if ld.result is None
        ]
        duration = time.monotonic() - t0
        # grouped actions may queue behind each other: allow for all of them
        max_action = sum(
            (a.timeout * (2 if a.end else 1) + a.hold) * a.schedule.times for a in actions
        )
        async with asyncio.timeout(max_action + 5):
            await asyncio.gather(*tasks)
        report()
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for loader in loaders:
            await loader.stop()

    results = [ld.result for ld in loaders if ld.result is not None]

    def cat(key: str, dtype: Any) -> Any:
        parts = [np.frombuffer(r[key], dtype=dtype) for r in results]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    return DrillResult(
        spec=spec,
        started_at=started_at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        duration=duration,
        t0=t0,
        start=cat("start", np.float64),
        latency=cat("latency", np.float64),
        code=cat("code", np.int16),
        target=cat("target", np.int16),
        reused=cat("reused", np.int8).astype(bool),
        actions=sorted(records, key=lambda r: r.start),
        resources=resources,
        not_sent=sum(int(r["not_sent"]) for r in results),
        ka_opened=sum(int(r.get("ka_opened", 0)) for r in results),
        ka_server_closed=sum(int(r.get("ka_server_closed", 0)) for r in results),
        ws_sessions=sum(int(r["ws_sessions"]) for r in results),
        ws_clean_closes=sum(int(r["ws_clean_closes"]) for r in results),
        ws_abnormal_closes=sum(int(r["ws_abnormal_closes"]) for r in results),
        drill_cpu_s=sum(float(r.get("cpu_s", 0.0)) for r in results),
        load_average=(load_start, os.getloadavg()[0]),
        errors=errors,
    )
