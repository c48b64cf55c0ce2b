"""The supervisor: generations of worker processes, zero-gap reload, crash policy.

The main process keeps its PID for the life of the service (systemd's MAINPID
never changes) and holds the listening sockets. It starts workers by fork+exec
(``python -m sdserve worker ...``, the same arguments as ``run``), passing them
the sockets, and listens to them on a private control channel that speaks the
sd_notify protocol: a worker's ordinary ``Notifier`` reports READY=1, STATUS=,
WATCHDOG=1 there, and ``X_SDSERVE_RECYCLE=1`` when it wants replacing.

- **Start:** READY=1 once every worker of generation 1 is ready. A worker that
  fails its start-up (exit status 3) fails the start, with its reason.
- **Crashes:** a worker that dies unasked is replaced after a backoff; more than
  ``crash_limit`` deaths within ``crash_window`` make the supervisor stop and exit
  with status 6 (crash loop) instead of spinning.
- **Reload (SIGHUP):** RELOADING=1, start a new generation (fresh imports, config
  re-read), and once all of it is ready, drain the old one, then READY=1. If the
  new generation fails, it is stopped and the old one keeps serving; STATUS= and
  the journal say so. A reload during a reload is queued (once); during shutdown
  it is refused.
- **Recycling:** a worker past ``max_requests`` is replaced the same way: the
  replacement is ready before the old worker drains.
- **Stop (SIGTERM):** STOPPING=1, every worker drains; past the kill deadline
  the stragglers get SIGKILL. A second signal forwards it (workers exit at once).
- **Orphans:** workers ask the kernel for SIGTERM when the supervisor dies
  (PR_SET_PDEATHSIG), so a SIGKILL of the supervisor leaves none behind.
- **Watchdog:** under ``WatchdogSec=`` each worker pings the supervisor; one
  that misses its deadline (a blocked event loop) gets SIGABRT (its stack goes
  to the journal) and is replaced, while the supervisor keeps systemd's
  watchdog fed from its own loop.
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
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .activation import Listener, listeners_from_fds
from .checks import run_bounded
from .config import Config, ConfigError
from .launcher import NotifyMessage, NotifySink
from .notify import Notifier
from .worker import ExitCode, serve_in_process

log = logging.getLogger("sdserve.supervisor")

#: extra time the supervisor gives workers past their own stop budget before SIGKILL
KILL_MARGIN = 2.0
#: first pause before replacing a crashed worker; doubles with each recent crash
RESPAWN_BACKOFF = 0.1
RESPAWN_BACKOFF_MAX = 5.0

ENV_FDS = "_SDSERVE_WORKER_FDS"
ENV_SUPERVISOR = "_SDSERVE_SUPERVISOR_PID"
ENV_WORKER = "_SDSERVE_WORKER_ID"
ENV_GENERATION = "_SDSERVE_GENERATION"
#: the CPU priority a worker returns to once warmed up
ENV_NICE = "_SDSERVE_NICE"

_PR_SET_PDEATHSIG = 1


def _fields(phase: str, **more: Any) -> dict[str, Any]:
    return {"SDSERVE_PHASE": phase, **{f"SDSERVE_{k.upper()}": v for k, v in more.items()}}


@dataclass(eq=False)
class WorkerProc:
    """One worker process as the supervisor sees it."""

    id: int
    generation: int
    process: asyncio.subprocess.Process
    spawned: float
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    status: str = ""
    #: the supervisor asked it to stop (so its exit is not a crash)
    retiring: bool = False
    recycle_requested: bool = False
    #: SIGKILLed by the supervisor at the kill deadline
    killed: bool = False
    watchdog: asyncio.TimerHandle | None = None
    exited: asyncio.Task[int] = field(init=False)

    def __post_init__(self) -> None:
        self.exited = asyncio.ensure_future(self.process.wait())

    @property
    def pid(self) -> int:
        return self.process.pid

    def signal(self, sig: int) -> None:
        if self.exited.done():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def retire(self) -> None:
        """Ask it to drain and exit."""
        self.retiring = True
        self.signal(signal.SIGTERM)

    def describe(self) -> str:
        return f"worker {self.id} (pid {self.pid}, generation {self.generation})"


class ReloadFailed(Exception):
    pass


class Supervisor:
    def __init__(
        self,
        config: Config,
        listeners: Sequence[Listener],
        notifier: Notifier,
        worker_args: Sequence[str],
        reload_config: Callable[[], Config],
    ) -> None:
        self.config = config
        self.listeners = list(listeners)
        self.notifier = notifier
        self.worker_args = list(worker_args)
        self.reload_config = reload_config
        self.workers: dict[int, WorkerProc] = {}
        self.generation = 0
        self.next_id = 1
        self.deaths: deque[float] = deque()
        self.stopping = False
        self.reloading = False
        self.fatal: tuple[ExitCode, str] | None = None
        self.last_reload = ""
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._reload = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._channel: NotifySink | None = None
        #: how often systemd wants WATCHDOG=1 (half of WatchdogSec=), or None
        self._watchdog_interval = notifier.watchdog_interval
        self._loop = asyncio.get_running_loop()

    # -- bookkeeping ---------------------------------------------------------------------

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("supervisor task failed: %r", exc, exc_info=exc, extra=_fields("supervisor"))
            self._fail(ExitCode.FAILURE, f"internal error: {exc!r}")

    def _fail(self, code: ExitCode, reason: str) -> None:
        if self.fatal is None:
            self.fatal = (code, reason)
        self._stop.set()

    def _current(self) -> list[WorkerProc]:
        return [w for w in self.workers.values() if w.generation == self.generation]

    def _update_status(self) -> None:
        self.notifier.status(self._status_line())

    # -- workers -------------------------------------------------------------------------

    def _worker_env(self, worker_id: int, generation: int) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("LISTEN_", "WATCHDOG_", "NOTIFY_SOCKET"))
        }
        assert self._channel is not None
        env["NOTIFY_SOCKET"] = self._channel.address
        env[ENV_FDS] = ",".join(f"{ls.fd}:{ls.name}" for ls in self.listeners)
        env[ENV_SUPERVISOR] = str(os.getpid())
        env[ENV_WORKER] = str(worker_id)
        env[ENV_GENERATION] = str(generation)
        env[ENV_NICE] = str(os.getpriority(os.PRIO_PROCESS, 0))
        # warm up at a lower CPU priority: imports must not slow the workers serving
        env["_SDSERVE_WARMUP_NICE"] = str(self.config.warmup_nice)
        if self._watchdog_interval is not None:
            # workers ping the supervisor as often as it pings systemd
            env["WATCHDOG_USEC"] = str(int(self._watchdog_interval * 2e6))
        return env

    async def _spawn(self, generation: int) -> WorkerProc:
        worker_id = self.next_id
        self.next_id += 1
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sdserve",
            "worker",
            *self.worker_args,
            env=self._worker_env(worker_id, generation),
            pass_fds=[ls.fd for ls in self.listeners],
            stdin=asyncio.subprocess.DEVNULL,
            # its own session: a terminal's Ctrl-C reaches the supervisor only
            start_new_session=True,
        )
        worker = WorkerProc(worker_id, generation, process, time.monotonic())
        self.workers[worker.pid] = worker
        worker.exited.add_done_callback(lambda _t: self._on_exit(worker))
        log.info("started %s", worker.describe(), extra=_fields("worker-start", worker=worker_id))
        return worker

    def _on_message(self, message: NotifyMessage) -> None:
        worker = self.workers.get(message.pid)
        if worker is None:
            return
        fields = message.fields
        if fields.get("WATCHDOG") == "1":
            self._arm_watchdog(worker)
        starting = not worker.ready.is_set() and not self.stopping
        if "STATUS" in fields:
            worker.status = fields["STATUS"]
            if starting and fields.get("READY") != "1":
                # what a starting worker waits for is what the operator wants to see
                self.notifier.status(f"{self._status_line()}; worker {worker.id}: {worker.status}")
            elif worker.ready.is_set() and not (self.stopping or self.reloading):
                self._update_status()  # a serving worker's readiness changed
        if "EXTEND_TIMEOUT_USEC" in fields and starting:
            # a worker still retrying its checks keeps systemd's start (or reload) waiting
            self.notifier.send(f"EXTEND_TIMEOUT_USEC={fields['EXTEND_TIMEOUT_USEC']}")
        if fields.get("READY") == "1" and not worker.ready.is_set():
            worker.ready.set()
            log.info(
                "%s ready after %.0f ms",
                worker.describe(),
                (time.monotonic() - worker.spawned) * 1000,
                extra=_fields("worker-ready", worker=worker.id),
            )
            if not self.reloading and not self.stopping:
                self._update_status()
        if fields.get("X_SDSERVE_RECYCLE") == "1" and not worker.recycle_requested:
            worker.recycle_requested = True
            self._spawn_task(self._recycle(worker))

    def _arm_watchdog(self, worker: WorkerProc) -> None:
        if self._watchdog_interval is None or worker.exited.done():
            return
        if worker.watchdog is not None:
            worker.watchdog.cancel()
        deadline = self._watchdog_interval * 2  # the whole WatchdogSec= without a ping
        worker.watchdog = self._loop.call_later(deadline, self._watchdog_missed, worker, deadline)

    def _watchdog_missed(self, worker: WorkerProc, deadline: float) -> None:
        log.error(
            "%s sent no watchdog ping for %.1fs (event loop blocked?): aborting it",
            worker.describe(),
            deadline,
            extra=_fields("watchdog", worker=worker.id),
        )
        worker.signal(signal.SIGABRT)  # faulthandler prints its stack to the journal
        self._loop.call_later(1.0, worker.signal, signal.SIGKILL)

    def _on_exit(self, worker: WorkerProc) -> None:
        self.workers.pop(worker.pid, None)
        if worker.watchdog is not None:
            worker.watchdog.cancel()
        code = worker.exited.result()
        how = f"exit status {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
        if worker.retiring or self.stopping:
            log.info("%s exited (%s)", worker.describe(), how, extra=_fields("worker-exit"))
            return
        level = logging.ERROR
        log.log(
            level,
            "%s died unexpectedly (%s)%s",
            worker.describe(),
            how,
            f"; last status: {worker.status}" if worker.status else "",
            extra=_fields("worker-died", worker=worker.id, exit=code),
        )
        if worker.generation != self.generation:
            return  # a failed new generation: the reload handles it
        if not worker.ready.is_set() and code == ExitCode.STARTUP and self.generation == 1:
            self._fail(ExitCode.STARTUP, worker.status or "a worker failed to start")
            return
        now = time.monotonic()
        self.deaths.append(now)
        while self.deaths and now - self.deaths[0] > self.config.crash_window:
            self.deaths.popleft()
        if len(self.deaths) >= self.config.crash_limit:
            reason = (
                f"crash loop: {len(self.deaths)} worker deaths within "
                f"{self.config.crash_window:g}s; giving up"
            )
            self._fail(ExitCode.CRASH_LOOP, reason)
            return
        delay = min(RESPAWN_BACKOFF * 2 ** (len(self.deaths) - 1), RESPAWN_BACKOFF_MAX)
        self._spawn_task(self._replace(worker.generation, delay))

    async def _replace(self, generation: int, delay: float) -> None:
        await asyncio.sleep(delay)  # crash backoff
        if self.stopping or generation != self.generation:
            return
        await self._spawn(generation)
        self._update_status()

    async def _wait_ready(self, workers: Sequence[WorkerProc], timeout: float) -> None:
        """Every worker ready; ReloadFailed if one exits first or time runs out."""
        deadline = time.monotonic() + timeout
        for worker in workers:
            ready = asyncio.ensure_future(worker.ready.wait())
            try:
                await asyncio.wait(
                    {ready, worker.exited},
                    timeout=max(0.0, deadline - time.monotonic()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                ready.cancel()
            if worker.ready.is_set():
                continue
            if worker.exited.done():
                detail = f": {worker.status}" if worker.status else ""
                raise ReloadFailed(
                    f"{worker.describe()} exited with status {worker.exited.result()} "
                    f"before it was ready{detail}"
                )
            raise ReloadFailed(f"{worker.describe()} was not ready within {timeout:g}s")

    async def _retire_all(self, workers: Sequence[WorkerProc], deadline: float) -> None:
        """Drain these workers; SIGKILL whatever is left at ``deadline`` (monotonic)."""
        for worker in workers:
            worker.retire()
        pending = {w.exited for w in workers if not w.exited.done()}
        if not pending:
            return
        _, late = await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
        if late:
            for worker in workers:
                if not worker.exited.done():
                    log.error(
                        "%s did not exit within the kill deadline: SIGKILL",
                        worker.describe(),
                        extra=_fields("kill", worker=worker.id),
                    )
                    worker.killed = True
                    worker.signal(signal.SIGKILL)
            await asyncio.wait(late)

    @property
    def kill_deadline(self) -> float:
        return self.config.stop_budget + KILL_MARGIN

    # -- recycle and reload --------------------------------------------------------------

    async def _recycle(self, old: WorkerProc) -> None:
        if self.stopping or self.reloading or old.generation != self.generation:
            return
        log.info("recycling %s after max_requests", old.describe(), extra=_fields("recycle"))
        new = await self._spawn(old.generation)
        try:
            await self._wait_ready([new], self.config.reload_timeout)
        except ReloadFailed as exc:
            log.error("recycling failed, keeping the old worker: %s", exc)
            new.retire()
            old.recycle_requested = False
            return
        await self._retire_all([old], time.monotonic() + self.kill_deadline)

    async def _do_reload(self) -> None:
        began = time.monotonic()
        self.notifier.reloading(f"reloading: starting generation {self.generation + 1}")
        log.info("reload: starting generation %d", self.generation + 1, extra=_fields("reload"))
        new: list[WorkerProc] = []
        try:
            try:
                config = self.reload_config()
            except ConfigError as exc:
                raise ReloadFailed(f"the new configuration is invalid: {exc}") from exc
            self.config = config
            generation = self.generation + 1
            deadline = time.monotonic() + config.reload_timeout
            batch = config.warmup_parallel or config.workers
            while len(new) < config.workers:
                started = [
                    await self._spawn(generation)
                    for _ in range(min(batch, config.workers - len(new)))
                ]
                new += started
                await self._wait_ready(started, max(0.0, deadline - time.monotonic()))
        except ReloadFailed as exc:
            for worker in new:
                worker.retire()
            stamp = time.strftime("%H:%M:%S")
            self.last_reload = f"reload FAILED at {stamp}, still serving the old code: {exc}"
            log.error(
                "reload failed, the old generation keeps serving: %s",
                exc,
                extra=_fields("reload-failed"),
            )
            await self._retire_all(new, time.monotonic() + self.kill_deadline)
            self.notifier.ready(self._status_line())
            return
        self.generation = generation
        # every older worker, including any that replaced a crashed one during the reload
        old = [w for w in self.workers.values() if w.generation != generation]
        await self._retire_all(old, time.monotonic() + self.kill_deadline)
        took = time.monotonic() - began
        self.last_reload = f"reloaded at {time.strftime('%H:%M:%S')} in {took:.2f}s"
        log.info(
            "reload done in %.0f ms: generation %d serving",
            took * 1000,
            self.generation,
            extra=_fields(
                "reloaded", duration_ms=round(took * 1000, 1), generation=self.generation
            ),
        )
        self.notifier.ready(self._status_line())

    def _status_line(self) -> str:
        current = self._current()
        ready = sum(1 for w in current if w.ready.is_set())
        parts = [f"generation {self.generation}: {ready}/{self.config.workers} workers ready"]
        # a serving worker whose dependencies fail says so ("not ready: db (...) failing")
        parts += [
            f"worker {w.id}: {w.status}"
            for w in current
            if w.ready.is_set() and ("failing" in w.status or w.status.startswith("not ready"))
        ]
        if self.last_reload:
            parts.append(self.last_reload)
        return "; ".join(parts)

    async def _reloader(self) -> None:
        while True:
            await self._reload.wait()
            self._reload.clear()
            if self.stopping:
                return
            self.reloading = True
            try:
                await self._do_reload()
            finally:
                self.reloading = False

    # -- signals -------------------------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            if self.stopping:
                log.warning(
                    "%s: reload refused, the service is stopping",
                    name,
                    extra=_fields("reload-refused"),
                )
            elif self.reloading:
                if self._reload.is_set():
                    log.warning("%s: a reload is already queued; ignoring this one", name)
                else:
                    log.warning("%s: a reload is in progress; queued one more", name)
                    self._reload.set()
            else:
                self._reload.set()
            return
        if self._stop.is_set():
            self._force.set()
        else:
            log.info("received %s", name, extra=_fields("signal"))
            self._stop.set()

    # -- whole life ----------------------------------------------------------------------

    async def run(self) -> ExitCode:
        loop = self._loop
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self._on_signal, sig)
        address = f"@sdserve/{os.getpid()}/{secrets.token_hex(8)}"
        self._channel = NotifySink(address, on_message=self._on_message, keep=False)
        watchdog: asyncio.Task[None] | None = None
        if self._watchdog_interval is not None:
            watchdog = asyncio.create_task(self._ping_systemd(self._watchdog_interval))
        try:
            return await self._life()
        finally:
            if watchdog is not None:
                watchdog.cancel()
            for task in list(self._tasks):
                task.cancel()
            self._channel.close()

    async def _ping_systemd(self, interval: float) -> None:
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)  # the ping period itself

    async def _life(self) -> ExitCode:
        cfg = self.config
        self.generation = 1
        self.notifier.status(f"starting {cfg.workers} worker(s)")
        first = [await self._spawn(1) for _ in range(cfg.workers)]
        self._update_status()
        starting = asyncio.ensure_future(self._wait_ready(first, cfg.start_timeout + KILL_MARGIN))
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not starting.done():
            starting.cancel()
            return await self._shutdown("stop requested during start-up")
        if (exc := starting.exception()) is not None:
            self._fail(ExitCode.STARTUP, str(self.fatal[1] if self.fatal else exc))
            return await self._shutdown(f"start failed: {exc}")
        self.notifier.ready(self._status_line())
        log.info(
            "ready: %d worker(s) serving", cfg.workers, extra=_fields("ready", workers=cfg.workers)
        )
        self._spawn_task(self._reloader())
        await self._stop.wait()
        return await self._shutdown("stopping")

    async def _shutdown(self, why: str) -> ExitCode:
        self.stopping = True
        # no reload, replacement or recycling may start a worker or send READY=1 now
        background = list(self._tasks)
        for task in background:
            task.cancel()
        if background:
            await asyncio.wait(background)
        if self.fatal is not None:
            reason = self.fatal[1]
            log.error("%s", reason, extra=_fields("fatal"))
            self.notifier.stopping(reason)
        else:
            self.notifier.stopping(f"{why}: draining {len(self.workers)} worker(s)")
        workers = list(self.workers.values())
        drain = asyncio.ensure_future(
            self._retire_all(workers, time.monotonic() + self.kill_deadline)
        )
        forced = asyncio.ensure_future(self._force.wait())
        try:
            await asyncio.wait({drain, forced}, return_when=asyncio.FIRST_COMPLETED)
            if forced.done():
                log.warning("second stop signal: workers exit at once", extra=_fields("forced"))
                for worker in workers:
                    worker.signal(signal.SIGTERM)  # their second signal: exit at once
                await asyncio.wait_for(drain, KILL_MARGIN + 1)
                return ExitCode.FORCED
        finally:
            forced.cancel()
        if self.fatal is not None:
            return self.fatal[0]
        # a worker still starting may die of the SIGTERM itself: nothing was lost there
        if any(w.killed or w.exited.result() == ExitCode.DRAIN_TIMEOUT for w in workers):
            return ExitCode.DRAIN_TIMEOUT
        return ExitCode.OK


def supervise(
    config: Config,
    listeners: Sequence[Listener],
    notifier: Notifier,
    worker_args: Sequence[str],
    reload_config: Callable[[], Config],
) -> int:
    async def main() -> ExitCode:
        supervisor = Supervisor(config, listeners, notifier, worker_args, reload_config)
        return await supervisor.run()

    return int(asyncio.run(main()))


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
    # a check run that ignores cancellation must not keep the worker from exiting
    serving = serve_in_process(
        config, listeners, notifier, before_ready=lambda: restore_priority(target)
    )
    return run_bounded(serving, grace=config.cleanup_timeout)
