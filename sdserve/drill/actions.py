"""Actions the drill performs on a schedule while the load runs.

An action is any ``async`` callable that raises when it fails.  Helpers build the
usual ones: a command from a template (``systemctl restart {unit}``, or the same
through ``nsenter`` inside a test bed), a signal to a PID or to the PID in a file,
killing a worker (a child of the target), and a dependency outage (a command that
starts it, another that ends it ``hold`` seconds later).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from sdserve.drill.resources import children
from sdserve.template import is_template

ActionFn = Callable[[], Awaitable[object]]
PidSource = Callable[[], Awaitable[int | None]]


class ActionError(RuntimeError):
    """An action did not do what it should (non-zero exit, no such process...)."""


@dataclass(frozen=True)
class Schedule:
    """Run ``times`` times, every ``every`` seconds, the first ``start`` seconds in.

    A run never starts before the previous one ended, nor less than ``min_gap``
    seconds after it (so that a service restarted again and again gets time to
    serve in between).
    """

    times: int = 1
    every: float = 5.0
    start: float = 1.0
    min_gap: float = 0.0

    def __post_init__(self) -> None:
        if self.times < 0 or self.every <= 0 or self.start < 0 or self.min_gap < 0:
            raise ValueError(f"bad schedule: {self}")

    def moments(self) -> list[float]:
        return [self.start + k * self.every for k in range(self.times)]


@dataclass(frozen=True)
class Action:
    """What to run and when.  ``end``, if given, runs ``hold`` seconds after ``run``
    finished (an outage); the action's window covers both."""

    name: str
    run: ActionFn
    schedule: Schedule = Schedule()
    end: ActionFn | None = None
    hold: float = 0.0
    timeout: float = 120.0
    #: actions of one group never overlap: a run waits for the one in progress (as
    #: systemd queues jobs on a unit); its window starts when it really begins
    group: str | None = None


@dataclass(frozen=True)
class ActionRecord:
    """One performed action; times in seconds since the drill's start."""

    name: str
    number: int
    start: float
    end: float
    ok: bool
    detail: str


async def run_command(argv: list[str], timeout: float) -> str:
    """Run a command; its output, or ActionError when it fails."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise ActionError(f"{shlex.join(argv)}: no exit within {timeout:g} s") from None
    text = out.decode(errors="replace").strip()
    if proc.returncode != 0:
        raise ActionError(f"{shlex.join(argv)}: exit status {proc.returncode}: {text[-500:]}")
    return text


def format_command(template: str, fields: Mapping[str, object]) -> list[str]:
    """Split a template like a shell would, then fill ``{name}`` fields in each word."""
    try:
        return [word.format_map(fields) for word in shlex.split(template)]
    except KeyError as exc:
        raise ValueError(f"{template!r}: unknown field {exc}") from None


def command(template: str, fields: Mapping[str, object] | None = None) -> ActionFn:
    """An action that runs a command template, e.g. ``systemctl restart {unit}``."""
    argv = format_command(template, fields or {})

    async def act() -> str:
        return await run_command(argv, timeout=120.0)

    return act


def const_pid(pid: int) -> PidSource:
    async def get() -> int | None:
        return pid

    return get


def pid_from_file(path: Path) -> PidSource:
    """The PID in a file, read each time (it changes on restart)."""

    def read() -> int | None:
        try:
            return int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    async def get() -> int | None:
        return read()  # a small file in /run or /tmp: not worth a thread

    return get


def pid_from_command(template: str, fields: Mapping[str, object] | None = None) -> PidSource:
    """The PID a command prints, e.g. ``systemctl show -p MainPID --value {unit}``."""
    argv = format_command(template, fields or {})

    async def get() -> int | None:
        try:
            out = await run_command(argv, timeout=10.0)
            pid = int(out.split()[0])
        except (ActionError, ValueError, IndexError):
            return None
        return pid or None

    return get


def send_signal(sig: signal.Signals, pid: PidSource) -> ActionFn:
    """An action that sends ``sig`` to the PID the source gives at that moment."""

    async def act() -> str:
        target = await pid()
        if target is None:
            raise ActionError(f"no PID to send {sig.name} to")
        try:
            os.kill(target, sig)
        except ProcessLookupError:
            raise ActionError(f"{sig.name}: no process {target}") from None
        return f"{sig.name} -> {target}"

    return act


def kill_worker(pid: PidSource, sig: signal.Signals = signal.SIGKILL) -> ActionFn:
    """An action that sends ``sig`` (SIGKILL by default) to the oldest child of the target
    (a worker: not a warm template, :mod:`sdserve.template`)."""

    async def act() -> str:
        parent = await pid()
        if parent is None:
            raise ActionError("no target PID to find a worker under")
        kids = [kid for kid in children(parent) if not is_template(kid)]
        if not kids:
            raise ActionError(f"process {parent} has no worker to kill")
        try:
            os.kill(kids[0], sig)
        except ProcessLookupError:
            raise ActionError(f"worker {kids[0]} was already gone") from None
        return f"{sig.name} -> worker {kids[0]} of {parent}"

    return act


def parse_signal(name: str) -> signal.Signals:
    name = name.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return signal.Signals[name]
    except KeyError:
        raise ValueError(f"unknown signal {name}") from None
