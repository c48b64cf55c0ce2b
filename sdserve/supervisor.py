"""The supervisor: worker processes around the state machine of :mod:`sdserve.lifecycle`.

The main process keeps its PID for the life of the service (systemd's MAINPID
never changes) and holds the listening sockets. This module is the shell: it
turns what happens into events for :class:`~sdserve.lifecycle.Lifecycle`, and
carries out the actions it returns. Every decision (start, reload, crash policy,
stop, exit status) is made there; see its docstring for the table.

- **Workers** are started by fork+exec (``python -m sdserve worker APP``) with the
  sockets, their generation's validated configuration (``_SDSERVE_CONFIG``, so a
  replacement never reads a config file that changed on disk) and a private
  control channel that speaks the sd_notify protocol: a worker's ordinary
  :class:`~sdserve.notify.Notifier` reports READY=1, STATUS=, WATCHDOG=1 there,
  ``X_SDSERVE_RECYCLE=1`` when it wants replacing and ``X_SDSERVE_START_FAILED=``
  when its start failed. Exits are seen on a pidfd per worker (no polling, no
  thread), and signals are sent through it (no PID reuse race).
- **Signals:** SIGTERM and SIGINT stop (a second one: workers exit at once),
  SIGQUIT exits at once, SIGHUP reloads. The handlers only queue an event.
- **``sdserve reload``** (``ExecReload=``) asks for a reload on the control socket
  (:mod:`sdserve.control`) and gets its outcome, so a failed reload fails
  ``systemctl reload``.
- **Connections handed over** (:mod:`sdserve.handover`): each worker has a link to
  the supervisor. A retiring worker sends its idle connections up; the supervisor
  spreads them over the ready workers of the serving generation. On the stop of a
  restart (:mod:`sdserve.intent`), with an fd store (``FileDescriptorStoreMax=``),
  workers send them up too and the supervisor puts each in systemd's store under a
  name of its own; the next instance finds them in ``LISTEN_FDS``, takes them out of
  the store at once, and hands them to its workers once they are all ready. On a plain
  stop, the retiring workers are told to drain what they hold instead of sending it up
  (the workers it would go to are stopping too), and connections still on their way go
  to a worker that drains, so they get the drain's grace rather than a close.
- **Orphans:** workers ask the kernel for SIGTERM when the supervisor dies
  (PR_SET_PDEATHSIG): a SIGKILL of the supervisor leaves none behind, and each
  drains what it holds.
- **Watchdog:** under ``WatchdogSec=`` the supervisor feeds systemd's watchdog from
  its own loop (until STOPPING=1), and each worker pings the supervisor once it is
  ready. A worker that misses a ping (a blocked event loop) gets SIGABRT (its
  stack goes to the journal), then SIGKILL, and is replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import faulthandler
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__, metrics
from . import lifecycle as lc
from .activation import Listener, listeners_from_fds
from .appload import StartFailure
from .canary import STATS_FIELD, RequestStats, Thresholds, judge, window
from .checks import run_bounded
from .config import Config, ConfigError, config_to_json
from .control import ControlServer, ReloadWaiter
from .exitcodes import ExitCode
from .handover import Link, close_fds, connection_name, link_pair
from .intent import RESTART_HINT, hand_over_on_this_stop
from .launcher import NotifyMessage, NotifySink
from .log import dropped_lines
from .log import fields as _fields
from .loops import factory
from .notify import Notifier
from .probes import START_CHECKS, StartupProbes, start_check_entries
from .reaper import parent_of, reaping
from .template import Adopted, Template
from .worker import serve_in_process, service_facts

log = logging.getLogger("sdserve.supervisor")

ENV_FDS = "_SDSERVE_WORKER_FDS"
ENV_SUPERVISOR = "_SDSERVE_SUPERVISOR_PID"
ENV_WORKER = "_SDSERVE_WORKER_ID"
ENV_GENERATION = "_SDSERVE_GENERATION"
#: the validated configuration of the worker's generation, as JSON
ENV_CONFIG = "_SDSERVE_CONFIG"
#: the CPU priority a worker returns to once warmed up
ENV_NICE = "_SDSERVE_NICE"
#: the worker's end of its link to the supervisor (an fd)
ENV_LINK = "_SDSERVE_LINK"
#: connections the supervisor holds for workers at most (more are closed)
POOL_MAX = 65536

_PR_SET_PDEATHSIG = 1


class WorkerProcess:
    """One worker process: the Popen (or the template's worker, adopted), and a pidfd that
    tells when it exits."""

    def __init__(self, worker: int, popen: subprocess.Popen[bytes] | Adopted, link: Link) -> None:
        self.worker = worker
        self.popen = popen
        self.pidfd = os.pidfd_open(popen.pid)
        self.link = link

    @property
    def pid(self) -> int:
        return self.popen.pid

    def signal(self, sig: int) -> None:
        if self.pidfd < 0:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, sig)

    def reap(self) -> int:
        """Its exit status (it has exited: the pidfd was readable); closes the pidfd."""
        code = self.popen.wait()
        os.close(self.pidfd)
        self.pidfd = -1
        return code


class Supervisor:
    def __init__(
        self,
        config: Config,
        listeners: Sequence[Listener],
        notifier: Notifier,
        reload_config: Callable[[], Config],
        *,
        connections: Sequence[tuple[str, int]] = (),
        store_capacity: int = 0,
        probes: StartupProbes | None = None,
        metrics_dir: Path | None = None,
    ) -> None:
        """``connections``: (FDNAME, fd) of connections found in systemd's fd store;
        ``store_capacity``: how many it takes (0: none); ``probes``: the admin socket's
        answers while no worker is ready (:mod:`sdserve.probes`)."""
        self._probes = probes
        self._probes_on = probes is not None
        #: the service's metrics (sdserve.metrics): the workers' files are folded in
        #: there as they exit
        self._metrics_dir = metrics_dir
        self._metrics: tuple[metrics.ServiceMetrics, metrics.SupervisorMetrics] | None = None
        if metrics_dir is not None:
            self._metrics = (metrics.ServiceMetrics(), metrics.SupervisorMetrics())
        #: each starting worker's latest round of start-up checks (JSON), for the probes
        self._start_checks: dict[int, str] = {}
        #: each worker's responses so far, as it last reported them (sdserve.canary)
        self._stats: dict[int, RequestStats] = {}
        #: the canary being watched, its baselines, start and end timer
        self._canary: lc.WatchCanary | None = None
        self._canary_base: dict[int, RequestStats] = {}
        self._canary_began = 0.0
        self._canary_timer: asyncio.TimerHandle | None = None
        self.listeners = list(listeners)
        self.notifier = notifier
        self.reload_config = reload_config
        self.store_capacity = store_capacity if config.handover else 0
        self._stored = 0
        #: connections waiting for a ready worker (fds owned here)
        self._pool: list[int] = []
        self._inherited = list(connections)
        self._rr = 0
        #: connections passed on: to workers, to the fd store, closed (nobody to take them);
        #: and of those to workers, how many came back first, sent to a worker that had
        #: stopped serving (or was gone) and passed on again
        self.moved = {"to_workers": 0, "to_store": 0, "closed": 0, "given_back": 0}
        self._loop = asyncio.get_running_loop()
        #: how often systemd wants WATCHDOG=1 (half of WatchdogSec=), or None
        self._watchdog_interval = notifier.watchdog_interval
        ping_deadline = None if self._watchdog_interval is None else self._watchdog_interval * 2
        self.core = lc.Lifecycle(
            config,
            clock=time.monotonic,
            wall=lambda: time.strftime("%H:%M:%S"),
            watchdog=ping_deadline,
        )
        self.procs: dict[int, WorkerProcess] = {}
        self._by_pid: dict[int, int] = {}
        self._timers: dict[lc.TimerKey, asyncio.TimerHandle] = {}
        self._events: deque[lc.Event] = deque()
        self._scheduled = False
        self._done: asyncio.Future[int] = self._loop.create_future()
        self._channel: NotifySink | None = None
        self._asking: asyncio.Task[None] | None = None
        #: `sdserve stopping` (ExecStop=) said the coming stop is part of a restart
        self._restart_hinted = False
        #: the stop under way is part of a restart (idle connections go to the store)
        self._stop_is_restart = False
        #: retiring workers told to drain what they hold (a stop that is no restart)
        self._drain_here: set[int] = set()
        self._stop_seen = False
        self._control = ControlServer(self._on_reload_request, on_status=self.snapshot)
        #: the warm template new workers are forked from (sdserve.template), or None
        self._template: Template | None = None
        if uses_template(config):
            self._template = Template(_inheritable_env())

    # -- events in -----------------------------------------------------------------------

    def feed(self, event: lc.Event) -> None:
        """Queue an event; the queue is worked off from the loop, in order."""
        self._events.append(event)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._work)

    def _work(self) -> None:
        self._scheduled = False
        while self._events and not self._done.done():
            event = self._events.popleft()
            try:
                actions = list(self.core.handle(event))
                if self._probes is not None:
                    # before the actions: a STATUS= sent is never newer than the probes
                    self._update_probes(self._probes)
                for action in actions:
                    self._execute(action)
            except Exception as exc:
                # a bug: exit; the workers get SIGTERM from the kernel and drain on their own
                log.critical(
                    "internal error handling %r: %r", event, exc, exc_info=exc, extra=_fields("bug")
                )
                self._done.set_result(int(ExitCode.FAILURE))
        if self.core.phase.stopping and not self._stop_seen:
            self._stop_seen = True
            if self.core.fatal is not None or not self._stop_is_restart:
                self._retiring_drain_here()
        if self._pool:
            self._route()
        if self._metrics is not None:
            self._sample_metrics(*self._metrics)

    def _sample_metrics(
        self, service: metrics.ServiceMetrics, sup: metrics.SupervisorMetrics
    ) -> None:
        core = self.core
        ready = sum(w.state is lc.WState.READY for w in core.workers.values())
        sup.workers.set(ready)
        service.ready.set(1 if ready and not core.phase.stopping else 0)
        service.sample(0, 0, {}, dropped_lines(), {})

    def _update_probes(self, probes: StartupProbes) -> None:
        """The supervisor answers the admin socket while no worker can: before the first
        is ready, and when none is left ready (the workers answer otherwise)."""
        core = self.core
        answer = not core.phase.stopping and not any(
            w.state is lc.WState.READY for w in core.workers.values()
        )
        if answer:
            live = {w.id for w in core.workers.values() if w.state.live}
            for gone in set(self._start_checks) - live:
                del self._start_checks[gone]
            probes.checks = start_check_entries(self._start_checks)
            probes.status = self.waiting_for()
        if answer != self._probes_on:
            self._probes_on = answer
            if answer:
                probes.resume()
            else:
                probes.pause()

    def snapshot(self) -> dict[str, Any]:
        """The service as ``sdserve status`` shows it."""
        return (
            service_facts(self.listeners)
            | {"mode": "supervisor"}
            | self.core.snapshot()
            | {"connections_moved": dict(self.moved)}
        )

    def waiting_for(self) -> str:
        """What the service waits for, worker by worker (the same words said once)."""
        core = self.core
        said: dict[str, list[int]] = {}
        for w in sorted(core.workers.values(), key=lambda w: w.id):
            if w.state.live:
                said.setdefault(w.status or "starting", []).append(w.id)
        parts = [core.status_line()]
        for text, ids in said.items():
            who = "worker" if len(ids) == 1 else "workers"
            parts.append(f"{who} {', '.join(map(str, ids))}: {text}")
        return "; ".join(parts)

    # -- connections handed over ---------------------------------------------------------

    def _from_worker(self, fds: list[int]) -> None:
        self._pool.extend(fds)
        self._route()

    def _returned(self, fds: list[int]) -> None:
        """Connections sent to a worker that had stopped serving, given back unserved."""
        self.moved["to_workers"] -= len(fds)
        self.moved["given_back"] += len(fds)
        self._from_worker(fds)

    def _undelivered(self, fds: list[int]) -> None:
        """Connections a link could not send (its worker is gone): to another worker,
        once the routing that sent them has returned."""
        self.moved["to_workers"] -= len(fds)
        self.moved["given_back"] += len(fds)
        self._pool.extend(fds)
        self._loop.call_soon(self._route_pool)

    def _route_pool(self) -> None:
        if self._pool and not self._done.done():
            self._route()

    def _targets(self) -> list[Link]:
        core = self.core
        links = []
        for w in core.workers.values():
            if w.generation == core.current and w.state is lc.WState.READY:
                proc = self.procs.get(w.id)
                if proc is not None and proc.link.open_to_serve:
                    links.append(proc.link)
        return links

    def _route(self) -> None:
        """Connections in the pool go to the serving workers, spread evenly; on a stop,
        to systemd's fd store; kept while the first generation starts."""
        core = self.core
        if core.phase.stopping:
            if core.fatal is None and self._stop_is_restart:
                self._to_store()
                return
            draining = [] if core.fatal is not None else self._draining()
            if not draining:
                # a failed start (in the store they would wait through every retry), or
                # nobody left to drain them
                self.moved["closed"] += len(self._pool)
                close_fds(self._pool)
                self._pool = []
                return
            pool, self._pool = self._pool, []
            draining[0].send(pool)  # answered within its grace, then closed, as in a drain
            self.moved["to_workers"] += len(pool)
            return
        if core.phase is lc.Phase.STARTING:
            return  # until every worker of the first generation is ready
        targets = self._targets()
        if not targets:
            if len(self._pool) > POOL_MAX:
                extra, self._pool = self._pool[POOL_MAX:], self._pool[:POOL_MAX]
                self.moved["closed"] += len(extra)
                close_fds(extra)
            return
        pool, self._pool = self._pool, []
        batches: list[list[int]] = [[] for _ in targets]
        for i, fd in enumerate(pool):
            batches[(self._rr + i) % len(targets)].append(fd)
        self._rr = (self._rr + len(pool)) % len(targets)
        for link, batch in zip(targets, batches, strict=True):
            if batch:
                link.send(batch)
        self.moved["to_workers"] += len(pool)

    def _draining(self) -> list[Link]:
        """Links of the workers that served and now stop, and of the retiring ones told
        to drain here (the others hand over themselves)."""
        return [
            proc.link
            for w in self.core.workers.values()
            if (
                w.state is lc.WState.STOPPING
                or (w.state is lc.WState.RETIRING and w.id in self._drain_here)
            )
            and w.ready_at is not None  # it serves: one stopped in its start would not
            and (proc := self.procs.get(w.id)) is not None
            and proc.link.open_to_serve
        ]

    def _retiring_drain_here(self) -> None:
        """The service stops and no restart follows: the retiring workers (of a reload or
        a recycle) drain what they hold instead of handing it up. They would hand it to
        the serving workers, which are stopping too and may be gone first; then the
        supervisor would have nobody to pass it to, and would have to close it under a
        client that may be sending (seen: a restart 0.3 s after a reload, which systemd
        runs without ExecStop=, so the stop cannot be told from a plain one)."""
        for w in self.core.workers.values():
            if w.state is lc.WState.RETIRING and (proc := self.procs.get(w.id)) is not None:
                self._drain_here.add(w.id)
                proc.link.say_drain_here()

    def _to_store(self) -> None:
        pool, self._pool = self._pool, []
        for fd in pool:
            if self._stored >= self.store_capacity:
                close_fds([fd])
                self.moved["closed"] += 1
                continue
            self._stored += 1
            if self.notifier.store_fds(connection_name(os.getpid(), self._stored), [fd]):
                self.moved["to_store"] += 1
            else:
                self.moved["closed"] += 1

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum == RESTART_HINT:
            self._restart_hinted = True
        elif signum == signal.SIGHUP:
            self.feed(lc.ReloadAsked(None, name))
        elif signum == signal.SIGQUIT:
            self.feed(lc.ForceAsked(name))
        elif self._asking is not None and not self._asking.done():
            # a second signal while asking: exit at once, as a second stop always does
            self._asking.cancel()
            self.feed(lc.StopAsked(name))
            self.feed(lc.StopAsked(name))
        elif self.store_capacity > 0 and self._asking is None and not self.core.phase.stopping:
            # a restart hands idle connections to the fd store, a stop drains them: ask
            # first (bounded), then stop
            self._asking = self._loop.create_task(self._stop_after_asking(name))
        else:
            self.feed(lc.StopAsked(name))

    async def _stop_after_asking(self, name: str) -> None:
        if await hand_over_on_this_stop(os.environ, hinted=self._restart_hinted, logger=log):
            self._stop_is_restart = True
            for proc in self.procs.values():
                proc.link.say_restarting()
        self.feed(lc.StopAsked(name))

    def _on_reload_request(self, waiter: ReloadWaiter) -> None:
        self.feed(lc.ReloadAsked(waiter.id, "sdserve reload", waiter.canary, waiter.watch))

    def _on_message(self, message: NotifyMessage) -> None:
        close_fds(list(message.fds))  # connections come over the links, never here
        worker = self._by_pid.get(message.pid)
        if worker is None:
            if message.fields.get("READY") == "1":
                self._stray(message.pid)
            return
        fields = message.fields
        if fields.get("WATCHDOG") == "1":
            self.feed(lc.Ping(worker))
        if "STATUS" in fields:
            self.feed(lc.Status(worker, fields["STATUS"]))
        if (usec := fields.get("EXTEND_TIMEOUT_USEC", "")).isdigit():
            self.feed(lc.Extend(worker, int(usec)))
        if fields.get("READY") == "1":
            self.feed(lc.Ready(worker))
        if fields.get("X_SDSERVE_RECYCLE") == "1":
            self.feed(lc.RecycleAsked(worker))
        if (counts := fields.get(STATS_FIELD)) is not None:
            try:
                self._stats[worker] = RequestStats.decode(counts)
            except ValueError:
                log.warning("worker %d sent unreadable counts: %.80r", worker, counts)
            else:
                self._judge_canary(final=False)
        if (checks := fields.get(START_CHECKS)) is not None:
            self._start_checks[worker] = checks
        if report := fields.get("X_SDSERVE_START_FAILED"):
            try:
                failure = StartFailure.from_json(report)
            except ValueError:
                failure = StartFailure(f"an unreadable report: {report[:200]!r}")
            self.feed(lc.StartFailedReport(worker, failure))

    def _stray(self, pid: int) -> None:
        """A child that says it is a ready worker, but none this supervisor started (one a
        failed warm template started after all, adopted): it drains and exits."""
        if parent_of(pid) != os.getpid():
            return  # gone already, or not this supervisor's: not its to stop
        log.warning(
            "process %d says it is a ready worker, but is none of this supervisor's: stopping it",
            pid,
            extra=_fields("stray", pid=pid),
        )
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

    def _on_exit(self, worker: int) -> None:
        # what it sent before it exited (its start failure...) comes before its exit
        if self._channel is not None:
            self._channel.drain()
        self._stats.pop(worker, None)  # after its last report: it counts no more
        self._drain_here.discard(worker)
        proc = self.procs.pop(worker)
        proc.link.drain()  # the connections it handed over just before it exited
        proc.link.close()
        self._loop.remove_reader(proc.pidfd)
        self._by_pid.pop(proc.pid, None)
        status = proc.reap()
        if self._metrics_dir is not None:
            metrics.retire(self._metrics_dir, proc.pid)  # its counts go on in the aggregate
        self.feed(lc.Exited(worker, status))

    # -- actions out ---------------------------------------------------------------------

    def _execute(self, action: lc.Action) -> None:
        if isinstance(action, lc.Spawn):
            self._spawn(action)
        elif isinstance(action, lc.Kill):
            if (proc := self.procs.get(action.worker)) is not None:
                proc.signal(action.signal)
        elif isinstance(action, lc.Notify):
            self._notify(action)
        elif isinstance(action, lc.SetTimer):
            if (old := self._timers.pop(action.key, None)) is not None:
                old.cancel()
            self._timers[action.key] = self._loop.call_later(action.delay, self._fire, action.key)
        elif isinstance(action, lc.CancelTimer):
            if (old := self._timers.pop(action.key, None)) is not None:
                old.cancel()
        elif isinstance(action, lc.Log):
            log.log(action.level, "%s", action.message, extra=action.fields)
            if self._metrics is not None:
                self._metrics[1].logged(action.fields)
        elif isinstance(action, lc.LoadConfig):
            try:
                self.feed(lc.ConfigLoaded(self.reload_config()))
            except ConfigError as exc:
                self.feed(lc.ConfigRejected(str(exc)))
        elif isinstance(action, lc.Reply):
            self._control.finish(action.waiter, action.verdict, action.text)
        elif isinstance(action, lc.Progress):
            self._control.progress(action.waiter, action.text)
        elif isinstance(action, lc.WatchCanary):
            self._watch_canary(action)
        elif isinstance(action, lc.Exit):
            self._done.set_result(action.code)

    # -- a canary reload (sdserve.canary) -------------------------------------------------

    def _watch_canary(self, action: lc.WatchCanary) -> None:
        """Counts from now on: each worker's baseline is what it has reported so far."""
        self._canary = action
        self._canary_base = dict(self._stats)
        self._canary_began = time.monotonic()
        self._canary_timer = self._loop.call_later(action.seconds, self._judge_canary, True)

    def _judge_canary(self, final: bool) -> None:
        watch = self._canary
        if watch is None:
            return
        core = self.core
        if core.incoming != watch.generation or core.phase.stopping:
            self._end_canary()  # the reload ended otherwise
            return

        def ready(generation: int) -> list[int]:
            return [
                w.id
                for w in core.workers.values()
                if w.generation == generation and w.state is lc.WState.READY
            ]

        cfg = core.generations[watch.generation].config
        limits = Thresholds(
            cfg.canary_min_requests, cfg.canary_error_margin, cfg.canary_latency_factor
        )
        old = window(self._stats, self._canary_base, ready(watch.against))
        new = window(self._stats, self._canary_base, ready(watch.generation))
        verdict = judge(old, new, limits, final=final)
        if verdict is None:
            return
        took = time.monotonic() - self._canary_began
        self._end_canary()
        self.feed(
            lc.CanaryVerdict(watch.generation, verdict.ok, f"{verdict.reason}, after {took:.1f}s")
        )

    def _end_canary(self) -> None:
        self._canary = None
        if self._canary_timer is not None:
            self._canary_timer.cancel()
            self._canary_timer = None

    def _fire(self, key: lc.TimerKey) -> None:
        self._timers.pop(key, None)
        self.feed(lc.TimerFired(key))

    def _notify(self, action: lc.Notify) -> None:
        kind, text = action.kind, action.text
        if kind == "ready":
            self.notifier.ready(f"{text}; sdserve {__version__}")
        elif kind == "reloading":
            self.notifier.reloading(text)
        elif kind == "stopping":
            self.notifier.stopping(text)
        elif kind == "status":
            self.notifier.status(text)
        elif kind == "extend":
            self.notifier.send(f"EXTEND_TIMEOUT_USEC={action.usec}")

    def _worker_env(self, action: lc.Spawn) -> dict[str, str]:
        env = _inheritable_env()
        assert self._channel is not None
        env["NOTIFY_SOCKET"] = self._channel.address
        env[ENV_FDS] = ",".join(f"{ls.fd}:{ls.name}" for ls in self.listeners)
        env[ENV_SUPERVISOR] = str(os.getpid())
        env[ENV_WORKER] = str(action.worker)
        env[ENV_GENERATION] = str(action.generation)
        env[ENV_CONFIG] = config_to_json(action.config)
        env[ENV_NICE] = str(os.getpriority(os.PRIO_PROCESS, 0))
        # warm up at a lower CPU priority: imports must not slow the workers serving
        env["_SDSERVE_WARMUP_NICE"] = str(action.config.warmup_nice)
        if self._watchdog_interval is not None:
            # workers ping the supervisor as often as it pings systemd
            env["WATCHDOG_USEC"] = str(int(self._watchdog_interval * 2e6))
        return env

    def _spawn(self, action: lc.Spawn) -> None:
        argv = [sys.executable, "-m", "sdserve", "worker", action.config.app]
        ours, theirs = link_pair()
        env = self._worker_env(action)
        env[ENV_LINK] = str(theirs.fileno())
        fds = [ls.fd for ls in self.listeners] + [theirs.fileno()]
        try:
            try:
                popen: subprocess.Popen[bytes] | Adopted | None = None
                if self._template is not None:
                    popen = self._template.spawn(argv, env, fds)
                    if popen is None:
                        # a template that failed may yet have started a worker with this
                        # link: the one started here gets a link of its own
                        ours.close()
                        theirs.close()
                        ours, theirs = link_pair()
                        env[ENV_LINK] = str(theirs.fileno())
                        fds[-1] = theirs.fileno()
                if popen is None:
                    popen = subprocess.Popen(
                        argv,
                        env=env,
                        pass_fds=fds,
                        stdin=subprocess.DEVNULL,
                        # its own session: a terminal's Ctrl-C reaches the supervisor only
                        start_new_session=True,
                    )
            finally:
                theirs.close()
            link = Link(
                ours,
                self._from_worker,
                on_returned=self._returned,
                on_undelivered=self._undelivered,
            )
            proc = WorkerProcess(action.worker, popen, link)
        except OSError as exc:
            ours.close()
            self.feed(lc.SpawnFailed(action.worker, str(exc)))
            return
        self.procs[action.worker] = proc
        self._by_pid[proc.pid] = action.worker
        self._loop.add_reader(proc.pidfd, self._on_exit, action.worker)
        self.feed(lc.Spawned(action.worker, proc.pid))

    def worker_pids(self) -> set[int]:
        """The workers' PIDs (and the warm template's): their exit statuses are this
        supervisor's to collect."""
        pids = {proc.pid for proc in self.procs.values()}
        if self._template is not None and (pid := self._template.pid) is not None:
            pids.add(pid)
        return pids

    # -- whole life ----------------------------------------------------------------------

    async def run(self) -> int:
        loop = self._loop
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, RESTART_HINT)
        for sig in handled:
            loop.add_signal_handler(sig, self._on_signal, sig)
        address = f"@sdserve/{os.getpid()}/{secrets.token_hex(8)}"
        self._channel = NotifySink(address, on_message=self._on_message, keep=False)
        await self._control.start()
        for name, fd in self._inherited:
            # out of the store at once: a connection systemd still holds never really closes
            self.notifier.remove_stored(name)
            self._pool.append(fd)
        self._inherited = []
        pinger: asyncio.Task[None] | None = None
        if self._watchdog_interval is not None:
            pinger = asyncio.create_task(self._ping_systemd(self._watchdog_interval))
        if self._template is not None:
            self._template.start()  # ready for the first reload; the first workers exec
        self.feed(lc.Start())
        try:
            return await self._done
        finally:
            if self._template is not None:
                self._template.close()
            if pinger is not None:
                pinger.cancel()
            for timer in self._timers.values():
                timer.cancel()
            self._timers.clear()
            for proc in self.procs.values():
                loop.remove_reader(proc.pidfd)
                proc.link.close()
            if self._pool:
                self.moved["closed"] += len(self._pool)
                close_fds(self._pool)
                self._pool = []
            if any(self.moved.values()):
                log.info(
                    "connections handed over: %d to workers, %d to the fd store, %d closed "
                    "(%d came back from a worker that had stopped, and were passed on)",
                    self.moved["to_workers"],
                    self.moved["to_store"],
                    self.moved["closed"],
                    self.moved["given_back"],
                    extra=_fields("handover", **self.moved),
                )
            if self._probes is not None:
                self._probes.stop()
            self._control.close()
            self._channel.close()
            for sig in handled:
                loop.remove_signal_handler(sig)
            self.notifier.flush(timeout=1.0)  # the last messages to systemd, bounded

    async def _ping_systemd(self, interval: float) -> None:
        # systemd stops watching once STOPPING=1 is sent; so do the pings
        while not self.core.phase.stopping:
            self.notifier.watchdog()
            await asyncio.sleep(interval)  # the ping period itself


def supervise(
    config: Config,
    listeners: Sequence[Listener],
    notifier: Notifier,
    reload_config: Callable[[], Config],
    *,
    connections: Sequence[tuple[str, int]] = (),
    store_capacity: int = 0,
    probes: StartupProbes | None = None,
) -> int:
    # before prometheus-client is imported: this process writes its files there too
    metrics_dir = metrics.setup_directory() if config.metrics else None

    async def main() -> int:
        supervisor = Supervisor(
            config,
            listeners,
            notifier,
            reload_config,
            connections=connections,
            store_capacity=store_capacity,
            probes=probes,
            metrics_dir=metrics_dir,
        )
        # the workers of a warm template are adopted: the supervisor is then a child
        # subreaper, and collects the other orphans too
        mode = "yes" if uses_template(config) else config.reap_orphans
        with reaping(mode, owned=supervisor.worker_pids):
            return await supervisor.run()

    try:
        return asyncio.run(main())
    finally:
        if metrics_dir is not None:
            metrics.remove_directory(metrics_dir)


def uses_template(config: Config) -> bool:
    """Whether workers are forked from a warm template (:mod:`sdserve.template`)."""
    return config.warm_template and config.reap_orphans != "no"


def _inheritable_env() -> dict[str, str]:
    """This process's environment less what is for it alone (systemd's sockets, watchdog
    and notify socket)."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LISTEN_", "WATCHDOG_", "NOTIFY_SOCKET"))
    }


# -- the worker side -------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """SIGTERM when the supervisor dies; exit now if it already has."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        sys.exit(f"sdserve worker: the supervisor (pid {parent}) is gone")


def worker_listeners(environ: dict[str, str] | os._Environ[str]) -> list[Listener]:
    spec = environ.get(ENV_FDS, "")
    fds: dict[int, str] = {}
    for item in filter(None, spec.split(",")):
        fd, _, name = item.partition(":")
        fds[int(fd)] = name
    return listeners_from_fds(fds)


def restore_priority(target: int) -> None:
    """Back to the supervisor's CPU priority once warmed up, if the limits allow it."""
    warm = os.getpriority(os.PRIO_PROCESS, 0)
    if warm <= target:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, target)
        log.info(
            "warmed up at CPU priority %d, serving at %d", warm, target, extra=_fields("priority")
        )
    except PermissionError:
        log.warning(
            "cannot return to CPU priority %d after warm-up (allow it with LimitNICE=%+d "
            "in the unit); all workers run at the same lower priority instead",
            target,
            target,
            extra=_fields("priority"),
        )


def run_worker(config: Config, notifier: Notifier) -> int:
    """Entry point of a worker process (``sdserve worker``), started by the supervisor."""
    parent = int(os.environ.get(ENV_SUPERVISOR, "0"))
    if parent:
        _die_with_parent(parent)
    faulthandler.enable()  # a watchdog SIGABRT prints where the loop was stuck
    listeners = worker_listeners(os.environ)
    target = int(os.environ.get(ENV_NICE, str(os.getpriority(os.PRIO_PROCESS, 0))))
    link = None
    if (link_fd := os.environ.pop(ENV_LINK, "")).isdigit():
        link = socket.socket(fileno=int(link_fd))
        link.set_inheritable(False)
    # a check run that ignores cancellation must not keep the worker from exiting
    serving = serve_in_process(
        config,
        listeners,
        notifier,
        before_ready=lambda: restore_priority(target),
        supervised=True,
        link=link,
    )
    return run_bounded(serving, grace=config.cleanup_timeout, loop_factory=factory(config.loop))
