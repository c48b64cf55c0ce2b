"""The supervisor's lifecycle as a state machine: pure, with no I/O, no processes, no timers.

:meth:`Lifecycle.handle` takes one event and returns the actions to carry out, in
order. The shell (:mod:`sdserve.supervisor`) turns signals, worker messages,
process exits, timers and ``sdserve reload`` requests into events, and carries out
the actions: spawn or signal a worker, notify systemd, set a timer, log, answer a
reload request, exit. Tests drive this class directly, with a fake clock.

The service goes through these phases (:class:`Phase`):

- ``starting``: generation 1 warms up; ``READY=1`` once every worker is ready.
- ``running``: serving. Dead workers are replaced, recycled ones swapped.
- ``warming`` (reload): the next generation starts beside the serving one, a few
  workers at a time (``warmup_parallel``). With a canary (:mod:`sdserve.canary`), its
  workers start first and serve beside the old generation; the rest start once the
  shell's verdict passes them (a failed one aborts the reload).
- ``switching`` (reload): the new generation serves; the old one drains.
  ``READY=1`` once it has exited.
- ``aborting`` (failed reload): the new generation is stopped; the old one never
  stopped serving. ``READY=1`` once the new one has exited.
- ``stopping``: every worker drains (``STOPPING=1``); exit once all have exited.
- ``forcing``: a second stop signal: every worker exits at once.
- ``done``: exited.

Each worker is ``starting``, ``ready``, ``retiring`` (SIGUSR2: drains at once, no
drain delay; a reload or a recycle replaced it), ``stopping`` (SIGTERM: the
service stops, or it was still starting) or ``forced`` (SIGQUIT). A worker is
signalled once per step: one that already drains is never told again (to a
worker a second SIGTERM means "exit at once").

Every event in every phase (``n/a``: cannot happen there, or ignored, with a log
line where it can):

=================== ============== ============== ============== ============== ============
event               starting       running        warming        switching,     stopping,
                                                                 aborting       forcing
=================== ============== ============== ============== ============== ============
SIGTERM, SIGINT     stop           stop           stop           stop           force (a
                                                                                second one)
SIGQUIT             force          force          force          force          force
reload (SIGHUP,     queue          begin reload   queue once     queue once     refuse
``sdserve reload``)
config loaded       n/a            n/a            start the new  n/a            n/a
/ rejected                                        gen (canary
                                                  first) / fail
canary verdict      n/a            n/a            pass: start    ignored        ignored
                                                  the rest;
                                                  fail: abort
worker ready        all ready:     (replacement)  start the next retire the     n/a
                    READY=1        retire the one warming; all   worker it
                                   it replaces    ready: switch  replaced
worker died,        fail (2, 3,    replace with   new gen: like  replace         record how
before ready or     limit) or      backoff;       "starting" but                the drain
young               retry          nothing serves abort the                     ended; all
                                   + limit: exit 6 reload                       gone: exit
old or failed gen   n/a            n/a            n/a            last one gone: n/a
worker exited                                                    READY=1
worker died after   replace        replace        replace        replace        (as above)
``crash_window``
recycle asked       start a        start a        start a        start a        n/a
                    successor      successor      successor      successor
watchdog missed     (not armed)    SIGABRT, then  SIGABRT, then  SIGABRT, then  (not armed)
                                   SIGKILL        SIGKILL        SIGKILL
start deadline      SIGKILL: fails SIGKILL: fails SIGKILL: fails SIGKILL: fails n/a
                    the start      a start        the reload     a start
kill deadline       n/a            SIGKILL        SIGKILL        SIGKILL        SIGKILL
=================== ============== ============== ============== ============== ============

Crash policy. A *failed start* is a worker that exits before it is ready, misses
its start deadline, or dies within ``crash_window`` of being ready; a worker that
has served ``crash_window`` resets its generation's count. Exit statuses 2 and 3
(bad configuration, the app or its checks failed) are the worker's own verdict:
they fail a start or a reload at once. Other failed starts are retried with
backoff, and ``crash_limit`` of them in a row fail it. Once the service has
started, a failed start only makes it retry, never stop, while any worker still
serves; with none left serving, ``crash_limit`` failed starts in a row exit with
status 6. Deaths of workers that have served (a kill, a watchdog abort, several at
once) are always replaced and never count.

Replacements run their generation's configuration, which the supervisor holds:
new configuration comes only with a reload. (The application's code is imported
by each new process from disk.)

Exit status: 3 or 6 as above; 5 after a second stop signal; 4 when a worker
draining for the stop cancelled requests at its deadline, was killed at the kill
deadline, or died; else 0. Notify messages keep systemd's order: ``READY=1``
only once started and after each ``RELOADING=1``; after ``STOPPING=1`` only
``STATUS=``.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .appload import StartFailure
from .config import Config
from .exitcodes import ExitCode
from .log import fields as _fields

#: extra time the supervisor gives workers past their own budget before SIGKILL
KILL_MARGIN = 2.0
#: pause before replacing a dead worker; doubles with each failed start in a row
RESPAWN_BACKOFF = 0.1
RESPAWN_BACKOFF_MAX = 5.0
#: after SIGABRT (a missed watchdog), SIGKILL this much later
ABORT_GRACE = 1.0
#: a worker's own verdict on its start: these fail a start or a reload at once
DETERMINISTIC_EXITS = frozenset({ExitCode.CONFIG, ExitCode.STARTUP})


class Phase(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    WARMING = "warming"
    SWITCHING = "switching"
    ABORTING = "aborting"
    STOPPING = "stopping"
    FORCING = "forcing"
    DONE = "done"

    @property
    def stopping(self) -> bool:
        return self in (Phase.STOPPING, Phase.FORCING, Phase.DONE)

    @property
    def reloading(self) -> bool:
        return self in (Phase.WARMING, Phase.SWITCHING, Phase.ABORTING)


class WState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    RETIRING = "retiring"
    STOPPING = "stopping"
    FORCED = "forced"

    @property
    def live(self) -> bool:
        """Counts towards its generation (not yet told to go)."""
        return self in (WState.STARTING, WState.READY)


# -- events ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    pass


@dataclass(frozen=True)
class StopAsked:
    signal: str


@dataclass(frozen=True)
class ForceAsked:
    signal: str


@dataclass(frozen=True)
class ReloadAsked:
    #: an ``sdserve reload`` client waiting for the outcome, or None (a plain SIGHUP)
    waiter: int | None
    source: str
    #: canary workers and watch (``sdserve reload --canary N --watch S``); None: the
    #: new configuration's ``canary_workers`` / ``canary_watch``
    canary: int | None = None
    watch: float | None = None


@dataclass(frozen=True)
class CanaryVerdict:
    """The shell's judgement of a canary (:mod:`sdserve.canary`)."""

    generation: int
    ok: bool
    reason: str


@dataclass(frozen=True)
class ConfigLoaded:
    config: Config


@dataclass(frozen=True)
class ConfigRejected:
    error: str


@dataclass(frozen=True)
class Spawned:
    worker: int
    pid: int


@dataclass(frozen=True)
class SpawnFailed:
    worker: int
    error: str


@dataclass(frozen=True)
class Ready:
    worker: int


@dataclass(frozen=True)
class Status:
    worker: int
    text: str


@dataclass(frozen=True)
class Extend:
    worker: int
    usec: int


@dataclass(frozen=True)
class Ping:
    worker: int


@dataclass(frozen=True)
class RecycleAsked:
    worker: int


@dataclass(frozen=True)
class StartFailedReport:
    worker: int
    failure: StartFailure


@dataclass(frozen=True)
class Exited:
    worker: int
    #: the process's exit status; negative: killed by that signal
    status: int


TimerKey = tuple[Any, ...]


@dataclass(frozen=True)
class TimerFired:
    key: TimerKey


Event = (
    Start
    | StopAsked
    | ForceAsked
    | ReloadAsked
    | CanaryVerdict
    | ConfigLoaded
    | ConfigRejected
    | Spawned
    | SpawnFailed
    | Ready
    | Status
    | Extend
    | Ping
    | RecycleAsked
    | StartFailedReport
    | Exited
    | TimerFired
)

# -- actions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Spawn:
    worker: int
    generation: int
    config: Config


@dataclass(frozen=True)
class Kill:
    worker: int
    signal: int


@dataclass(frozen=True)
class Notify:
    """One sd_notify message: ``kind`` is ready, reloading, stopping, status or extend."""

    kind: str
    text: str = ""
    usec: int = 0


@dataclass(frozen=True)
class LoadConfig:
    """Read the configuration again; answer with ConfigLoaded or ConfigRejected."""


@dataclass(frozen=True)
class SetTimer:
    """Fire TimerFired(key) after ``delay`` seconds, replacing a timer of the same key."""

    key: TimerKey
    delay: float


@dataclass(frozen=True)
class CancelTimer:
    key: TimerKey


@dataclass(frozen=True)
class Log:
    level: int
    message: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reply:
    """The verdict for a waiting ``sdserve reload``: ok, failed or refused."""

    waiter: int
    verdict: str
    text: str


@dataclass(frozen=True)
class Progress:
    waiter: int
    text: str


@dataclass(frozen=True)
class Exit:
    code: int


@dataclass(frozen=True)
class WatchCanary:
    """Compare the ready canary workers of ``generation`` with the workers of ``against``
    for ``seconds``, then answer with CanaryVerdict (earlier when it fails)."""

    generation: int
    against: int
    seconds: float


Action = (
    Spawn
    | Kill
    | Notify
    | LoadConfig
    | SetTimer
    | CancelTimer
    | Log
    | Reply
    | Progress
    | Exit
    | WatchCanary
)

# -- state -------------------------------------------------------------------------------


@dataclass
class WorkerRec:
    id: int
    generation: int
    slot: int
    spawned: float
    state: WState = WState.STARTING
    pid: int = 0
    ready_at: float | None = None
    #: recycling: the worker of the same slot that this one replaces once ready
    successor_of: int | None = None
    #: it asked to be recycled (max_requests)
    recycle: bool = False
    status: str = ""
    #: why sdserve SIGKILLed it ("start deadline", "kill deadline", "watchdog")
    killed: str = ""
    failure: StartFailure | None = None
    #: it was live when the service stop began: how its drain ends is the exit status
    in_stop: bool = False

    def describe(self) -> str:
        return f"worker {self.id} (pid {self.pid}, generation {self.generation})"


@dataclass
class Generation:
    number: int
    config: Config
    #: slots not started yet (a reload warms up a few at a time)
    waiting: list[int] = field(default_factory=list)
    #: failed starts in a row; a worker that served crash_window resets it
    failed_starts: int = 0
    #: the traceback of a failed start is logged once per generation
    failure_logged: bool = False
    #: the reason then logged (a later worker failing the same way says so)
    logged_reason: str = ""
    #: why the latest start failed (for STATUS= while retrying)
    last_failure: str = ""
    #: a reload's canary: this many workers start first and are judged over ``watch``
    canary: int = 0
    watch: float = 0.0
    #: the canary is being watched / was judged and passed
    watching: bool = False
    judged: bool = False


def describe_status(status: int) -> str:
    if status >= 0:
        return f"exit status {status}"
    try:
        return f"signal {signal.Signals(-status).name}"
    except ValueError:
        return f"signal {-status}"


class Lifecycle:
    """The supervisor's decisions; see the module docstring."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float],
        wall: Callable[[], str],
        watchdog: float | None = None,
    ) -> None:
        """``clock`` is monotonic seconds; ``wall`` the time of day for STATUS= lines;
        ``watchdog`` the longest a ready worker may go without a ping (None: off)."""
        self.clock = clock
        self.wall = wall
        self.watchdog = watchdog
        self.phase = Phase.STARTING
        self.generations: dict[int, Generation] = {1: Generation(1, config)}
        self.current = 1
        #: the generation a reload is warming up
        self.incoming: int | None = None
        #: the generation a failed reload is stopping
        self.aborted: int | None = None
        self.workers: dict[int, WorkerRec] = {}
        self.next_id = 1
        self.reload_queued = False
        self.queued_waiters: list[int] = []
        self.reload_waiters: list[int] = []
        self.reload_began = 0.0
        self.reload_failure = ""
        self.last_reload = ""
        #: the canary asked for by the reload under way: (workers, watch) or None
        self.reload_canary: tuple[int | None, float | None] = (None, None)
        self.respawns: set[TimerKey] = set()
        self.fatal: tuple[ExitCode, str] | None = None
        self.forced = False
        #: how drains of the stop ended badly (one line each); non-empty: exit status 4
        self.stop_losses: list[str] = []
        self._out: list[Action] = []

    # -- helpers -------------------------------------------------------------------------

    @property
    def config(self) -> Config:
        """The serving generation's configuration."""
        return self.generations[self.current].config

    def _emit(self, *actions: Action) -> None:
        self._out.extend(actions)

    def _log(self, level: int, message: str, phase: str, **fields: Any) -> None:
        self._emit(Log(level, message, _fields(phase, **fields)))

    def _notify(self, kind: str, text: str = "", usec: int = 0) -> None:
        # after STOPPING=1 systemd hears STATUS= only
        if self.phase.stopping and kind not in ("status", "stopping"):
            return
        self._emit(Notify(kind, text, usec))

    def live(self, generation: int) -> list[WorkerRec]:
        return [w for w in self.workers.values() if w.generation == generation and w.state.live]

    def primary(self, generation: int, slot: int) -> WorkerRec | None:
        for w in self.workers.values():
            if (
                w.generation == generation
                and w.slot == slot
                and w.state.live
                and w.successor_of is None
            ):
                return w
        return None

    def successor(self, generation: int, slot: int) -> WorkerRec | None:
        for w in self.workers.values():
            if w.generation == generation and w.slot == slot and w.successor_of is not None:
                return w
        return None

    def ready_count(self, generation: int) -> int:
        gen = self.generations[generation]
        return sum(
            1
            for slot in range(gen.config.workers)
            if (p := self.primary(generation, slot)) is not None and p.state is WState.READY
        )

    def serving(self) -> bool:
        return any(w.state is WState.READY for w in self.workers.values())

    def snapshot(self) -> dict[str, Any]:
        """The service as ``sdserve status`` shows it (JSON-ready; ages in seconds)."""
        now = self.clock()
        cur = self.generations[self.current]
        workers = [
            {
                "id": w.id,
                "pid": w.pid,
                "generation": w.generation,
                "state": w.state.value,
                "age": round(now - w.spawned, 3),
                "ready_for": None if w.ready_at is None else round(now - w.ready_at, 3),
                "status": w.status,
            }
            for w in sorted(self.workers.values(), key=lambda w: w.id)
        ]
        return {
            "phase": self.phase.value,
            "generation": cur.number,
            "incoming": self.incoming,
            "workers_wanted": cur.config.workers,
            "workers_ready": self.ready_count(cur.number),
            "failed_starts": cur.failed_starts,
            "last_failure": cur.last_failure,
            "last_reload": self.last_reload,
            "status": self.status_line(),
            "workers": workers,
        }

    def status_line(self) -> str:
        cur = self.generations[self.current]
        parts = [
            f"generation {cur.number}: {self.ready_count(cur.number)}/{cur.config.workers} "
            "workers ready"
        ]
        # a serving worker whose dependencies fail says so ("not ready: db (...) failing"),
        # and one that sheds load ("ready; shedding load (concurrency limit 12)")
        parts += [
            f"worker {w.id}: {w.status}"
            for w in self.live(cur.number)
            if w.state is WState.READY
            and (
                "failing" in w.status or w.status.startswith("not ready") or "shedding" in w.status
            )
        ]
        if self.incoming is not None:
            nxt = self.generations[self.incoming]
            parts.append(
                f"reloading: generation {nxt.number}: "
                f"{self.ready_count(nxt.number)}/{nxt.config.workers} workers ready"
            )
        retrying = any(k[1] == cur.number for k in self.respawns) or any(
            w.state is WState.STARTING for w in self.live(cur.number)
        )
        if cur.failed_starts and retrying and self.phase is not Phase.STARTING:
            short = self.ready_count(cur.number) < cur.config.workers
            parts.append(
                f"{'degraded' if short else 'recycling fails'}: {cur.failed_starts} failed "
                f"start(s) in a row, retrying (last: {cur.last_failure})"
            )
        if self.last_reload:
            parts.append(self.last_reload)
        return "; ".join(parts)

    # -- the entry point -----------------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        """Decide what ``event`` means in the current phase; return the actions, in order."""
        self._out = []
        if self.phase is Phase.DONE:
            return []
        handler = getattr(self, f"_on_{type(event).__name__}")
        handler(event)
        out, self._out = self._out, []
        return out

    # -- start ---------------------------------------------------------------------------

    def _on_Start(self, event: Start) -> None:
        cfg = self.config
        self._notify("status", f"starting {cfg.workers} worker(s)")
        for slot in range(cfg.workers):
            self._spawn(1, slot)

    def _spawn(self, generation: int, slot: int, successor_of: int | None = None) -> None:
        gen = self.generations[generation]
        w = WorkerRec(self.next_id, generation, slot, self.clock(), successor_of=successor_of)
        self.next_id += 1
        self.workers[w.id] = w
        self._emit(Spawn(w.id, generation, gen.config))
        if generation == self.incoming:
            deadline = gen.config.reload_timeout
        else:
            deadline = gen.config.start_timeout + KILL_MARGIN
        self._emit(SetTimer(("start", w.id), deadline))

    def _on_Spawned(self, event: Spawned) -> None:
        w = self.workers.get(event.worker)
        if w is None:
            return
        w.pid = event.pid
        self._log(logging.INFO, f"started {w.describe()}", "worker-start", worker=w.id)

    def _on_SpawnFailed(self, event: SpawnFailed) -> None:
        w = self.workers.get(event.worker)
        if w is None:
            return
        w.failure = StartFailure(f"could not start a worker process: {event.error}")
        self._exited(w, 127)

    def _on_Ready(self, event: Ready) -> None:
        w = self.workers.get(event.worker)
        if w is None or w.state is WState.READY:
            return
        now = self.clock()
        if w.state is not WState.STARTING:
            # told to stop while it started: it drains as it was told, and it has served
            w.ready_at = now
            return
        w.state = WState.READY
        w.ready_at = now
        gen = self.generations[w.generation]
        self._emit(CancelTimer(("start", w.id)))
        self._emit(SetTimer(("proven", w.id), gen.config.crash_window))
        if self.watchdog is not None:
            self._emit(SetTimer(("watchdog", w.id), self.watchdog))
        self._log(
            logging.INFO,
            f"{w.describe()} ready after {(now - w.spawned) * 1000:.0f} ms",
            "worker-ready",
            worker=w.id,
        )
        if w.successor_of is not None:
            old = self.workers.get(w.successor_of)
            w.successor_of = None
            if old is not None and old.state is WState.READY:
                self._retire(old)
        if self.phase is Phase.STARTING:
            if self.ready_count(1) == gen.config.workers:
                self.phase = Phase.RUNNING
                self._notify("ready", self.status_line())
                self._log(
                    logging.INFO,
                    f"ready: {gen.config.workers} worker(s) serving",
                    "ready",
                    workers=gen.config.workers,
                )
                self._after_reload_or_start()
            else:
                self._notify("status", self.status_line())
        elif self.phase is Phase.WARMING and w.generation == self.incoming:
            self._warm_next()
        else:
            self._notify("status", self.status_line())

    def _on_Status(self, event: Status) -> None:
        w = self.workers.get(event.worker)
        if w is None:
            return
        w.status = event.text
        if w.state is WState.STARTING and self._watched_start(w):
            # what a starting worker waits for is what the operator wants to see
            self._notify("status", f"{self.status_line()}; worker {w.id}: {w.status}")
        elif w.state is WState.READY and self.phase is Phase.RUNNING:
            self._notify("status", self.status_line())  # a serving worker's readiness changed

    def _watched_start(self, w: WorkerRec) -> bool:
        """Whether systemd waits for this worker (the start, or a reload's warm-up)."""
        if self.phase is Phase.STARTING:
            return w.generation == 1
        return self.phase is Phase.WARMING and w.generation == self.incoming

    def _on_Extend(self, event: Extend) -> None:
        w = self.workers.get(event.worker)
        if w is not None and w.state is WState.STARTING and self._watched_start(w):
            # a worker still retrying its checks keeps systemd's start (or reload) waiting
            self._notify("extend", usec=event.usec)

    def _on_Ping(self, event: Ping) -> None:
        w = self.workers.get(event.worker)
        if w is not None and w.state is WState.READY and self.watchdog is not None:
            self._emit(SetTimer(("watchdog", w.id), self.watchdog))

    def _on_StartFailedReport(self, event: StartFailedReport) -> None:
        w = self.workers.get(event.worker)
        if w is None:
            return
        w.failure = event.failure
        gen = self.generations[w.generation]
        failure = event.failure
        if not gen.failure_logged:
            gen.failure_logged = True
            gen.logged_reason = failure.reason
            text = f"{w.describe()} failed to start: {failure.reason}"
            if failure.traceback:
                text += "\n" + failure.traceback
            more = {"app_file": failure.file, "app_line": failure.line} if failure.file else {}
            self._log(logging.ERROR, text, "start-failed", worker=w.id, **more)
        else:
            # compared with the generation's record: the worker that failed first may
            # have exited (and left self.workers) before this report came
            same = failure.reason == gen.logged_reason
            self._log(
                logging.INFO,
                f"{w.describe()} failed to start too"
                + (" (the same reason)" if same else f": {failure.reason}"),
                "start-failed",
                worker=w.id,
            )

    # -- exits ---------------------------------------------------------------------------

    def _on_Exited(self, event: Exited) -> None:
        w = self.workers.get(event.worker)
        if w is not None:
            self._exited(w, event.status)

    def _exited(self, w: WorkerRec, status: int) -> None:
        del self.workers[w.id]
        for kind in ("start", "kill", "watchdog", "abort", "proven"):
            self._emit(CancelTimer((kind, w.id)))
        how = describe_status(status)
        if not w.state.live or self.phase.stopping:
            level = logging.INFO if status == ExitCode.OK else logging.WARNING
            self._log(level, f"{w.describe()} exited ({how})", "worker-exit", exit=status)
            if w.in_stop:
                self._record_stop_drain(w, status, how)
        else:
            self._unasked_exit(w, status, how)
        self._progress()

    def _record_stop_drain(self, w: WorkerRec, status: int, how: str) -> None:
        if status == ExitCode.OK and not w.killed:
            return
        if status == ExitCode.DRAIN_TIMEOUT:
            loss = f"{w.describe()} cancelled requests at its shutdown deadline"
        elif w.ready_at is None:
            return  # killed or failed during its start-up: it had served nothing
        elif w.killed:
            loss = f"{w.describe()} was killed at the {w.killed}"
        elif status == ExitCode.FORCED:
            loss = f"{w.describe()} exited at once (second stop signal)"
        else:
            loss = f"{w.describe()} died while draining ({how})"
        self.stop_losses.append(loss)

    def _unasked_exit(self, w: WorkerRec, status: int, how: str) -> None:
        now = self.clock()
        gen = self.generations[w.generation]
        young = w.ready_at is None or now - w.ready_at < gen.config.crash_window
        last = f"; last status: {w.status}" if w.status and w.failure is None else ""
        reported = w.failure is not None and self.generations[w.generation].failure_logged
        if reported:
            # its reason is in the journal once already (StartFailedReport)
            text = f"{w.describe()} exited after its failed start ({how})"
        elif w.ready_at is None:
            text = f"{w.describe()} exited before it was ready ({how}){last}"
        else:
            text = f"{w.describe()} died unexpectedly ({how}){last}"
        self._log(
            logging.INFO if reported else logging.ERROR,
            text,
            "worker-died",
            worker=w.id,
            exit=status,
            cause=w.killed or ("start" if w.ready_at is None else "crash"),
        )
        if w.successor_of is None:
            heir = self.successor(w.generation, w.slot)
            if heir is not None:
                heir.successor_of = None  # the replacement that was warming takes the slot
                self._notify("status", self.status_line())
                return
        if w.generation not in (self.current, self.incoming):
            return  # a generation on its way out: nothing to replace
        if not young:
            self._schedule_respawn(gen, w.slot)
            return
        gen.failed_starts += 1
        reason = self._failure_reason(w, status, how)
        gen.last_failure = reason
        deterministic = status in DETERMINISTIC_EXITS or w.killed == "start deadline"
        over = gen.failed_starts >= gen.config.crash_limit
        if self.phase is Phase.STARTING:
            if deterministic or over:
                self._fail(ExitCode.STARTUP, f"start failed: {reason}", logged=reported)
                return
        elif w.generation == self.incoming:
            if deterministic or over:
                self._abort_reload(reason)
                return
        elif over and not self.serving():
            self._fail(
                ExitCode.CRASH_LOOP,
                f"crash loop: {gen.failed_starts} failed starts in a row and no worker "
                f"left serving; giving up (last: {reason})",
            )
            return
        self._schedule_respawn(gen, w.slot)

    def _failure_reason(self, w: WorkerRec, status: int, how: str) -> str:
        if w.failure is not None:
            return f"{w.describe()}: {w.failure.reason}"
        if w.killed == "start deadline":
            gen = self.generations[w.generation]
            if w.generation == self.incoming:
                limit = f"reload_timeout ({gen.config.reload_timeout:g}s)"
            else:
                limit = f"start_timeout ({gen.config.start_timeout:g}s) + {KILL_MARGIN:g}s"
            return f"{w.describe()} was not ready within {limit}"
        if w.ready_at is None:
            detail = f": {w.status}" if w.status else ""
            return f"{w.describe()} exited ({how}) before it was ready{detail}"
        age = self.clock() - w.ready_at
        return f"{w.describe()} died {age:.1f}s after it was ready ({how})"

    def _schedule_respawn(self, gen: Generation, slot: int) -> None:
        delay = min(RESPAWN_BACKOFF * 2**gen.failed_starts, RESPAWN_BACKOFF_MAX)
        key = ("respawn", gen.number, slot)
        self.respawns.add(key)
        self._emit(SetTimer(key, delay))
        self._notify("status", self.status_line())

    def _progress(self) -> None:
        """After an exit: finish what was waiting for workers to be gone."""
        if self.phase is Phase.SWITCHING:
            if not any(w.generation != self.current for w in self.workers.values()):
                took = self.clock() - self.reload_began
                self._finish_reload(
                    "ok",
                    f"reloaded at {self.wall()} in {took:.2f}s",
                    f"reload done in {took * 1000:.0f} ms: generation {self.current} serving",
                    took,
                )
        elif self.phase is Phase.ABORTING:
            if not any(w.generation == self.aborted for w in self.workers.values()):
                self._finish_reload(
                    "failed",
                    f"reload FAILED at {self.wall()}, still serving the old code: "
                    f"{self.reload_failure}",
                    "",
                    self.clock() - self.reload_began,
                )
        elif self.phase in (Phase.STOPPING, Phase.FORCING) and not self.workers:
            self._done()

    # -- timers --------------------------------------------------------------------------

    def _on_TimerFired(self, event: TimerFired) -> None:
        kind, *rest = event.key
        if kind == "respawn":
            self.respawns.discard(event.key)
            self._respawn(int(rest[0]), int(rest[1]))
            return
        w = self.workers.get(int(rest[0]))
        if w is None:
            return
        if kind == "start" and w.state is WState.STARTING:
            limit = self.generations[w.generation].config
            self._log(
                logging.ERROR,
                f"{w.describe()} was not ready in time: SIGKILL",
                "kill",
                worker=w.id,
                limit=limit.reload_timeout
                if w.generation == self.incoming
                else limit.start_timeout,
            )
            w.killed = "start deadline"
            self._emit(Kill(w.id, signal.SIGKILL))
        elif kind == "kill":
            self._log(
                logging.ERROR,
                f"{w.describe()} did not exit within the kill deadline: SIGKILL",
                "kill",
                worker=w.id,
            )
            w.killed = "kill deadline"
            self._emit(Kill(w.id, signal.SIGKILL))
        elif kind == "watchdog" and w.state is WState.READY and self.watchdog is not None:
            self._log(
                logging.ERROR,
                f"{w.describe()} sent no watchdog ping for {self.watchdog:.1f}s "
                "(event loop blocked?): aborting it",
                "watchdog",
                worker=w.id,
            )
            w.killed = "watchdog"
            self._emit(Kill(w.id, signal.SIGABRT))  # faulthandler prints its stack
            self._emit(SetTimer(("abort", w.id), ABORT_GRACE))
        elif kind == "abort":
            self._emit(Kill(w.id, signal.SIGKILL))
        elif kind == "proven":
            self.generations[w.generation].failed_starts = 0

    def _respawn(self, generation: int, slot: int) -> None:
        if self.phase.stopping or generation not in (self.current, self.incoming):
            return
        primary = self.primary(generation, slot)
        if primary is None:
            self._spawn(generation, slot)
        elif (
            primary.recycle
            and primary.state is WState.READY
            and self.successor(generation, slot) is None
        ):
            self._spawn(generation, slot, successor_of=primary.id)
        if generation == self.incoming:
            self._extend_reload()

    # -- recycling -----------------------------------------------------------------------

    def _on_RecycleAsked(self, event: RecycleAsked) -> None:
        w = self.workers.get(event.worker)
        if (
            w is None
            or w.state is not WState.READY
            or self.phase.stopping
            or w.generation not in (self.current, self.incoming)
            or w.recycle
        ):
            return
        w.recycle = True
        self._log(logging.INFO, f"recycling {w.describe()} after max_requests", "recycle")
        self._spawn(w.generation, w.slot, successor_of=w.id)

    def _retire(self, w: WorkerRec) -> None:
        """Drain at once (no drain delay): a reload or a recycle made it redundant."""
        cfg = self.generations[w.generation].config
        w.state = WState.RETIRING
        self._emit(Kill(w.id, signal.SIGUSR2))
        self._emit(CancelTimer(("watchdog", w.id)))
        deadline = cfg.shutdown_timeout + cfg.cleanup_timeout + KILL_MARGIN
        self._emit(SetTimer(("kill", w.id), deadline))

    def _stop_worker(self, w: WorkerRec) -> None:
        """SIGTERM: drain with the drain delay (or stop a start)."""
        cfg = self.generations[w.generation].config
        w.state = WState.STOPPING
        self._emit(Kill(w.id, signal.SIGTERM))
        self._emit(CancelTimer(("watchdog", w.id)))
        self._emit(CancelTimer(("start", w.id)))
        self._emit(SetTimer(("kill", w.id), cfg.stop_budget + KILL_MARGIN))

    def _dismiss(self, w: WorkerRec) -> None:
        """Send a worker of a generation that is going away on its way."""
        if w.state is WState.READY:
            self._retire(w)
        elif w.state is WState.STARTING:
            self._stop_worker(w)

    # -- reload --------------------------------------------------------------------------

    def _on_ReloadAsked(self, event: ReloadAsked) -> None:
        if self.phase.stopping:
            self._log(
                logging.WARNING,
                f"{event.source}: reload refused, the service is stopping",
                "reload-refused",
            )
            if event.waiter is not None:
                self._emit(Reply(event.waiter, "refused", "the service is stopping"))
            return
        if self.phase is Phase.RUNNING:
            if event.waiter is not None:
                self.reload_waiters.append(event.waiter)
            self._begin_reload(event.canary, event.watch)
            return
        # starting, or a reload in progress: one more reload afterwards, with newer code
        if event.waiter is not None:
            self.queued_waiters.append(event.waiter)
            self._emit(Progress(event.waiter, f"queued: the service is {self.phase.value}"))
        if self.reload_queued:
            self._log(
                logging.WARNING,
                f"{event.source}: a reload is already queued; this one joins it",
                "reload",
            )
        else:
            self.reload_queued = True
            self._log(
                logging.WARNING,
                f"{event.source}: the service is {self.phase.value}; queued one more reload",
                "reload",
            )

    def _begin_reload(self, canary: int | None = None, watch: float | None = None) -> None:
        self.phase = Phase.WARMING
        self.reload_began = self.clock()
        self.reload_canary = (canary, watch)
        number = max(self.generations) + 1
        self._notify("reloading", f"reloading: starting generation {number}")
        self._log(logging.INFO, f"reload: starting generation {number}", "reload")
        for waiter in self.reload_waiters:
            self._emit(Progress(waiter, f"starting generation {number}"))
        self._emit(LoadConfig())

    def _on_ConfigLoaded(self, event: ConfigLoaded) -> None:
        if self.phase is not Phase.WARMING or self.incoming is not None:
            return  # a stop came first
        cfg = event.config
        if cfg.workers < 1:
            self._on_ConfigRejected(
                ConfigRejected("workers = 0 (a single process) cannot be reached by a reload")
            )
            return
        number = max(self.generations) + 1
        gen = Generation(number, cfg, waiting=list(range(cfg.workers)))
        canary, watch = self.reload_canary
        gen.canary = min(cfg.canary_workers if canary is None else canary, cfg.workers)
        gen.watch = cfg.canary_watch if watch is None else watch
        self.generations[number] = gen
        self.incoming = number
        self._warm_next()

    def _on_ConfigRejected(self, event: ConfigRejected) -> None:
        if self.phase is not Phase.WARMING or self.incoming is not None:
            return
        self.reload_failure = f"the new configuration is invalid: {event.error}"
        self._log(
            logging.ERROR,
            f"reload failed, the old generation keeps serving: {self.reload_failure}",
            "reload-failed",
        )
        self._finish_reload(
            "failed",
            f"reload FAILED at {self.wall()}, still serving the old code: {self.reload_failure}",
            "",
            self.clock() - self.reload_began,
        )

    def _warm_next(self) -> None:
        """Keep ``warmup_parallel`` new workers warming; switch once all are ready."""
        assert self.incoming is not None
        gen = self.generations[self.incoming]
        batch = gen.config.warmup_parallel or gen.config.workers
        warming = sum(1 for w in self.live(gen.number) if w.state is WState.STARTING)
        started = False
        # a canary: its workers first, and the rest only once it is judged
        held = gen.canary > 0 and not gen.judged
        allowed = gen.canary - (gen.config.workers - len(gen.waiting)) if held else len(gen.waiting)
        while gen.waiting and warming < batch and allowed > 0:
            self._spawn(gen.number, gen.waiting.pop(0))
            warming += 1
            allowed -= 1
            started = True
        if started:
            self._extend_reload()
        ready = self.ready_count(gen.number)
        if held:
            if ready >= gen.canary and not gen.watching:
                self._watch_canary(gen)
            elif not gen.watching:
                self._notify("status", self.status_line())
            return
        for waiter in self.reload_waiters:
            self._emit(
                Progress(waiter, f"generation {gen.number}: {ready}/{gen.config.workers} ready")
            )
        if not gen.waiting and ready == gen.config.workers:
            self._switch()
        else:
            self._notify("status", self.status_line())

    def _watch_canary(self, gen: Generation) -> None:
        gen.watching = True
        text = (
            f"canary: {gen.canary} worker(s) of generation {gen.number} serve beside "
            f"generation {self.current}; watching for {gen.watch:g}s"
        )
        self._log(logging.INFO, text, "canary")
        for waiter in self.reload_waiters:
            self._emit(Progress(waiter, text))
        self._notify("status", f"{self.status_line()}; {text}")
        # systemd's bound on the reload job: the watch, then the rest of the warm-up
        bound = gen.watch + gen.config.reload_timeout + KILL_MARGIN
        self._notify("extend", usec=int(bound * 1e6))
        self._emit(WatchCanary(gen.number, self.current, gen.watch))

    def _on_CanaryVerdict(self, event: CanaryVerdict) -> None:
        gen = self.generations.get(event.generation)
        if gen is None or event.generation != self.incoming or not gen.watching:
            return  # the reload ended otherwise meanwhile (a stop, a failed canary start)
        gen.watching = False
        if not event.ok:
            self._abort_reload(f"canary rolled back: {event.reason}")
            return
        gen.judged = True
        text = f"canary passed: {event.reason}"
        self._log(logging.INFO, text, "canary")
        for waiter in self.reload_waiters:
            self._emit(Progress(waiter, text))
        self._warm_next()

    def _extend_reload(self) -> None:
        """systemd bounds the reload job: each new step of a reload moves that bound."""
        assert self.incoming is not None
        cfg = self.generations[self.incoming].config
        self._notify("extend", usec=int((cfg.reload_timeout + KILL_MARGIN) * 1e6))

    def _switch(self) -> None:
        assert self.incoming is not None
        self.phase = Phase.SWITCHING
        self.current, self.incoming = self.incoming, None
        old = [w for w in self.workers.values() if w.generation != self.current]
        for w in old:
            self._dismiss(w)
        if old:
            cfg = self.config
            bound = max(cfg.stop_budget, cfg.shutdown_timeout + cfg.cleanup_timeout)
            self._notify("extend", usec=int((bound + KILL_MARGIN) * 1e6))
            self._notify("status", f"{self.status_line()}; draining {len(old)} old worker(s)")
        self._progress()

    def _abort_reload(self, reason: str) -> None:
        assert self.incoming is not None
        self.phase = Phase.ABORTING
        self.aborted, self.incoming = self.incoming, None
        self.reload_failure = reason
        self._log(
            logging.ERROR,
            f"reload failed, the old generation keeps serving: {reason}",
            "reload-failed",
        )
        for key in [k for k in self.respawns if k[1] == self.aborted]:
            self.respawns.discard(key)
            self._emit(CancelTimer(key))
        for w in list(self.workers.values()):
            if w.generation == self.aborted:
                self._dismiss(w)
        self._progress()

    def _finish_reload(self, verdict: str, summary: str, log_text: str, took: float) -> None:
        self.phase = Phase.RUNNING
        self.last_reload = summary
        self.aborted = None
        # generations whose workers are all gone are forgotten
        for number in list(self.generations):
            if number != self.current and not any(
                w.generation == number for w in self.workers.values()
            ):
                del self.generations[number]
        if log_text:
            self._log(
                logging.INFO,
                log_text,
                "reloaded",
                duration_ms=round(took * 1000, 1),
                generation=self.current,
            )
        self._notify("ready", self.status_line())
        for waiter in self.reload_waiters:
            self._emit(Reply(waiter, verdict, summary))
        self.reload_waiters = []
        self._after_reload_or_start()

    def _after_reload_or_start(self) -> None:
        """Back to running: start the queued reload, if any."""
        if self.reload_queued:
            self.reload_queued = False
            self.reload_waiters, self.queued_waiters = self.queued_waiters, []
            self._begin_reload()

    # -- stop ----------------------------------------------------------------------------

    def _on_StopAsked(self, event: StopAsked) -> None:
        if self.phase is Phase.STOPPING:
            self._force(f"second stop signal ({event.signal})")
        elif self.phase is Phase.FORCING:
            self._log(logging.INFO, f"{event.signal}: already exiting at once", "signal")
        else:
            self._log(logging.INFO, f"received {event.signal}", "signal")
            self._begin_stop("stopping")

    def _on_ForceAsked(self, event: ForceAsked) -> None:
        if self.phase is Phase.FORCING:
            return
        if not self.phase.stopping:
            self._begin_stop(f"received {event.signal}")
        if self.phase is Phase.STOPPING:
            self._force(event.signal)

    def _fail(self, code: ExitCode, reason: str, *, logged: bool = False) -> None:
        """Stop the service with exit status ``code``; ``logged``: the reason is in the
        journal already (a worker's reported start failure), so it is not repeated."""
        if self.fatal is None:
            self.fatal = (code, reason)
            if logged:
                text = f"giving up: the start failed (exit status {int(code)}; reason above)"
                self._log(logging.INFO, text, "fatal", exit=int(code))
            else:
                self._log(logging.ERROR, reason, "fatal", exit=int(code))
        if not self.phase.stopping:
            self._begin_stop(reason)

    def _begin_stop(self, why: str) -> None:
        reloading = self.phase.reloading
        self.phase = Phase.STOPPING
        for key in sorted(self.respawns):
            self._emit(CancelTimer(key))
        self.respawns.clear()
        live = list(self.workers.values())
        for w in live:
            w.in_stop = True
            if w.state.live:
                self._stop_worker(w)
        if self.fatal is not None:
            self._notify("stopping", self.fatal[1])
        else:
            self._notify("stopping", f"{why}: draining {len(live)} worker(s)")
        for waiter in self.reload_waiters:
            self._emit(Reply(waiter, "failed", "the service began stopping during the reload"))
        for waiter in self.queued_waiters:
            self._emit(Reply(waiter, "refused", "the service is stopping"))
        if reloading:
            self._log(logging.WARNING, "stop during a reload: every generation drains", "stopping")
        self.reload_waiters, self.queued_waiters = [], []
        self.reload_queued = False
        self.incoming = None
        self._progress()

    def _force(self, why: str) -> None:
        self.phase = Phase.FORCING
        self.forced = True
        self._log(logging.WARNING, f"{why}: workers exit at once", "forced")
        for w in self.workers.values():
            if w.state is not WState.FORCED:
                w.state = WState.FORCED
                self._emit(Kill(w.id, signal.SIGQUIT))
                self._emit(SetTimer(("kill", w.id), KILL_MARGIN))
        self._progress()

    def _done(self) -> None:
        self.phase = Phase.DONE
        if self.fatal is not None:
            code = int(self.fatal[0])
        elif self.forced:
            code = int(ExitCode.FORCED)
        elif self.stop_losses:
            code = int(ExitCode.DRAIN_TIMEOUT)
            for loss in self.stop_losses:
                self._log(logging.ERROR, f"requests were lost in the stop: {loss}", "exit")
        else:
            code = int(ExitCode.OK)
        self._log(logging.INFO, f"exiting with status {code}", "exit", exit=code)
        self._emit(Exit(code))
