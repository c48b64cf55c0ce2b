"""What sdserve does as PID 1 (a container's entrypoint): reap orphans, honour stop signals.

**Orphans.** A process whose parent exits is re-parented to PID 1 of its PID namespace (or
to the nearest child subreaper). When it ends, only that new parent can collect its exit
status; until then it stays a zombie, holding its PID. An init such as tini collects every
child; sdserve cannot, because its supervisor waits for its own workers (``Popen.wait`` on
their pidfds) and the application may wait for the subprocesses it started: a blind
``waitpid(-1)`` would steal those exit statuses (and ``Popen`` would then report 0 for a
worker that crashed). So the :class:`Reaper`, on each ``SIGCHLD`` (an event of the loop,
no polling), lists this process's zombie children from ``/proc`` and reaps, by PID, only
those that are not its own (``owned``: the supervisor's workers) and that nobody has
collected for :data:`GRACE` seconds (the application's own children, whose owner waits
for them at once). A zombie still waiting for its grace sets a timer for the end of it.

``reap_orphans = "auto"`` reaps when sdserve is PID 1; ``"yes"`` also elsewhere, and
makes sdserve a child subreaper (``PR_SET_CHILD_SUBREAPER``) so that orphans of its
descendants come to it; ``"no"`` never.

**Signals.** The kernel does not deliver to PID 1 a signal for which PID 1 has no
handler (SIGKILL and SIGSTOP from outside aside): ``podman stop``'s SIGTERM to a process
that has not yet installed its handlers is simply lost, and the stop waits out its whole
timeout. :func:`stop_signals_before_serving` installs handlers at once that do what the
default action does to any other process (it ends, here with status 128 + N, as a shell
reports it); the serving loop's own handlers replace them once it runs, and from then on
a stop drains as usual.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from .config import ReapOrphans
from .log import fields

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger("sdserve.reaper")

#: seconds a zombie child that is not a worker is left to its owner before it is reaped
GRACE = 1.0
_PR_SET_CHILD_SUBREAPER = 36
#: the signals a serving sdserve handles that would end any other process before then
EARLY_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def wants_reaping(mode: ReapOrphans, pid: int | None = None) -> bool:
    """Whether to reap orphans: ``auto`` as PID 1 only."""
    return mode == "yes" or (mode == "auto" and (os.getpid() if pid is None else pid) == 1)


def _stat(path: Path) -> tuple[str, str, int]:
    """A process's command name, state and parent PID, from its ``stat`` file."""
    stat = path.read_text()
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
    return comm, state, int(ppid)


def parent_of(pid: int, proc: Path = Path("/proc")) -> int | None:
    """Process ``pid``'s parent, or None: it is gone."""
    try:
        return _stat(proc / str(pid) / "stat")[2]
    except OSError:
        return None


def zombie_children(pid: int, proc: Path = Path("/proc")) -> dict[int, str]:
    """The zombie children of process ``pid`` (the PIDs of the namespace of ``proc``),
    with their command names."""
    found: dict[int, str] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm, state, ppid = _stat(entry / "stat")
        except OSError:  # gone meanwhile (reaped by its parent)
            continue
        if state == "Z" and ppid == pid:
            found[int(entry.name)] = comm
    return found


def describe_status(code: int) -> str:
    """``exit status N`` or ``signal SIGX`` (as the supervisor says it), from an exit code
    (``os.waitstatus_to_exitcode``: -N when killed by signal N). Kept here: the
    lifecycle's imports bring aiohttp, which ``sdserve run`` imports only later."""
    if code >= 0:
        return f"exit status {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"


class Reaper:
    """Reaps this process's zombie children that are not ``owned``, after ``grace`` seconds.

    Runs on the running asyncio loop: :meth:`start` handles ``SIGCHLD`` there (and sweeps
    once, for zombies that came before), :meth:`stop` removes the handler.
    """

    def __init__(
        self,
        owned: Callable[[], Collection[int]] = frozenset,
        *,
        grace: float = GRACE,
        clock: Callable[[], float] = time.monotonic,
        proc: Path = Path("/proc"),
    ) -> None:
        self.owned = owned
        self.grace = grace
        self.clock = clock
        self.proc = proc
        #: orphans reaped so far
        self.reaped = 0
        self._pid = os.getpid()
        self._seen: dict[int, float] = {}  # zombie -> when it was first seen
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_signal_handler(signal.SIGCHLD, self.sweep)
        self.sweep()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGCHLD)
            self._loop = None

    def sweep(self) -> None:
        """Reap the zombies past their grace; set a timer for the next one's."""
        zombies = zombie_children(self._pid, self.proc)
        owned = set(self.owned())
        now = self.clock()
        self._seen = {
            pid: self._seen.get(pid, now) for pid in zombies if pid not in owned
        }  # those collected meanwhile by their owner are forgotten
        for pid, since in list(self._seen.items()):
            if now - since >= self.grace:
                del self._seen[pid]
                self._reap(pid, zombies[pid])
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._seen and self._loop is not None:
            due = min(self._seen.values()) + self.grace - now
            self._timer = self._loop.call_later(max(0.0, due), self.sweep)

    def _reap(self, pid: int, comm: str) -> None:
        try:
            reaped, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # collected by its owner between the listing and now
            return
        if reaped != pid:
            return
        self.reaped += 1
        code = os.waitstatus_to_exitcode(status)  # -N: killed by signal N
        log.info(
            "reaped orphan %d (%s): %s",
            pid,
            comm,
            describe_status(code),
            extra=fields(
                "reap",
                orphan=pid,
                comm=comm,
                status=code,
                reaped=self.reaped,
            ),
        )


def become_subreaper() -> None:
    """Orphans of this process's descendants come to it (``PR_SET_CHILD_SUBREAPER``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


@contextlib.contextmanager
def reaping(mode: ReapOrphans, owned: Callable[[], Collection[int]] = frozenset) -> Iterator[None]:
    """Reap orphans on the running loop while the block runs, when ``mode`` asks for it."""
    if not wants_reaping(mode):
        yield
        return
    import asyncio

    if os.getpid() != 1:
        become_subreaper()
    reaper = Reaper(owned)
    reaper.start(asyncio.get_running_loop())
    log.info(
        "reaping orphaned processes (%s)",
        "PID 1" if os.getpid() == 1 else "child subreaper",
        extra=fields("reap"),
    )
    try:
        yield
    finally:
        reaper.stop()


def _exit_like_default(signum: int, frame: FrameType | None) -> None:
    # as the default action would end any other process: at once (nothing serves yet)
    name = signal.Signals(signum).name
    os.write(2, f"sdserve: {name} before serving: exiting (status {128 + signum})\n".encode())
    os._exit(128 + signum)


def stop_signals_before_serving() -> None:
    """As PID 1, handle the stop signals from now on (the kernel drops those without a
    handler): until the serving loop installs its own, each ends the process at once."""
    if os.getpid() != 1:
        return
    for sig in EARLY_SIGNALS:
        signal.signal(sig, _exit_like_default)
