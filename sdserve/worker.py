"""One serving process: sockets in, the application's requests out, a graceful drain on stop.

:func:`serve` is the whole life of a worker, driven from outside by two events,
``stop`` (drain and exit) and ``force`` (exit now). It is used as-is by the
single-process mode and by each worker process of the supervisor. The order:

1. import and build the application; add sdserve's tracking and health routes;
2. run the app's start-up hooks, then the dependency checks and warm-up steps
   (nothing is accepted yet: early connections wait in the kernel queue);
3. start accepting, then send ``READY=1``;
4. on ``stop``: report not ready, ``STOPPING=1``, keep serving for ``drain_delay``,
   stop accepting, drain (see :mod:`sdserve.drain`), run the app's shutdown and
   cleanup hooks (most recently registered first), and return the exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import time
from collections.abc import Callable, Sequence
from enum import IntEnum
from typing import Any

from aiohttp import web

from . import health
from .acceptor import Acceptor
from .activation import Listener
from .appload import AppLoadError, build_app
from .checks import StartupFailed, checks_from_config, registry, wait_until_ready
from .config import Config, ConfigError
from .drain import TrackedRequestHandler, Tracker
from .monitor import CheckMonitor
from .notify import Notifier
from .state import Phase, WorkerState

log = logging.getLogger("sdserve.worker")

ADMIN_SOCKET = "admin"


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1
    #: bad configuration or usage
    CONFIG = 2
    #: the application did not load, or its checks / warm-up did not pass in time
    STARTUP = 3
    #: requests were still running at the shutdown deadline and were cancelled
    DRAIN_TIMEOUT = 4
    #: a second stop signal: exited at once, without draining
    FORCED = 5
    #: the supervisor gave up: workers kept crashing
    CRASH_LOOP = 6


def _reverse_hooks(app: web.Application) -> None:
    """Run on_shutdown and on_cleanup hooks last-registered-first, like a stack."""
    for hooks in (app.on_shutdown, app.on_cleanup):
        hooks.reverse()


async def _watchdog(notifier: Notifier, interval: float) -> None:
    """WATCHDOG=1 from the event loop: a blocked loop stops the pings, and systemd acts."""
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)  # the ping period itself


async def _wait_first(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


def _fields(phase: str, **more: Any) -> dict[str, Any]:
    return {"SDSERVE_PHASE": phase, **{f"SDSERVE_{k.upper()}": v for k, v in more.items()}}


class Worker:
    """The application served on a set of listeners; see the module docstring."""

    def __init__(
        self,
        config: Config,
        listeners: Sequence[Listener],
        notifier: Notifier,
        app: web.Application | None = None,
        before_ready: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self._before_ready = before_ready
        self.listeners = list(listeners)
        self.notifier = notifier
        self.state = WorkerState()
        self.tracker = Tracker(config.idle_grace, config.max_concurrency)
        if config.max_requests:
            # jitter, so that workers started together are not recycled together
            jitter = random.randint(0, config.max_requests_jitter)
            self.tracker.request_limit = config.max_requests + jitter
            self.tracker.on_limit = self._ask_to_be_recycled
        self._app = app
        self._runners: list[web.AppRunner] = []
        self._acceptors: list[Acceptor] = []
        self.monitor: CheckMonitor | None = None

    def _ask_to_be_recycled(self) -> None:
        log.info(
            "served %d requests: asking the supervisor for a replacement",
            self.tracker.request_limit,
            extra=_fields("recycle"),
        )
        self.notifier.send("X_SDSERVE_RECYCLE=1")

    # -- start ---------------------------------------------------------------------------

    def _handler_kwargs(self) -> dict[str, Any]:
        return {
            "keepalive_timeout": self.config.keepalive_timeout,
            "access_log": logging.getLogger("sdserve.access") if self.config.access_log else None,
        }

    async def _prepare(self, app: web.Application, admin: bool) -> web.AppRunner:
        show = self.config.health
        if show.enabled and (show.placement in ("both", "admin" if admin else "main")):
            self.tracker.exempt_paths |= health.install(app, self.state, show, admin=admin)
        self.tracker.install(app)
        _reverse_hooks(app)
        kwargs = self._handler_kwargs()
        runner = web.AppRunner(app, handle_signals=False, **kwargs)
        await runner.setup()
        self._runners.append(runner)
        server = runner.server
        assert server is not None
        for listener in self.listeners:
            if (listener.name == ADMIN_SOCKET) != admin:
                continue

            def factory(server: web.Server = server) -> TrackedRequestHandler:
                return TrackedRequestHandler(
                    self.tracker, server, loop=asyncio.get_running_loop(), **kwargs
                )

            self._acceptors.append(Acceptor(listener, factory, self.tracker))
        return runner

    async def _start(self) -> None:
        cfg = self.config
        started = time.monotonic()
        deadline = started + cfg.start_timeout
        self.notifier.status("loading the application")
        app = self._app if self._app is not None else await build_app(cfg.app)
        reg = registry(app)
        checks_from_config(reg, cfg.checks)
        self.state.registry = reg
        self.notifier.status("running the application's start-up hooks")
        async with asyncio.timeout(cfg.start_timeout):
            await self._prepare(app, admin=False)
            if any(ls.name == ADMIN_SOCKET for ls in self.listeners):
                await self._prepare(web.Application(), admin=True)
        names = ", ".join(reg.checks) or "none"
        self.notifier.status(f"checking dependencies: {names}")
        results = await wait_until_ready(
            reg,
            self.notifier,
            deadline=deadline,
            retry_initial=cfg.retry_initial,
            retry_max=cfg.retry_max,
        )
        self.state.record(results)
        checks_done = time.monotonic()
        self.monitor = CheckMonitor(self.state, reg, cfg.health, self.notifier)
        self.monitor.start()
        if self._before_ready is not None:
            self._before_ready()
        for acceptor in self._acceptors:
            acceptor.start()
        self.state.phase = Phase.READY
        self.state.ready_at = time.monotonic()
        where = ", ".join(f"{ls.name}={ls.address}" for ls in self.listeners)
        self.notifier.ready(f"serving on {where}")
        log.info(
            "ready after %.0f ms (checks passed %.2f ms before READY=1), serving on %s",
            (self.state.ready_at - started) * 1000,
            (self.state.ready_at - checks_done) * 1000,
            where,
            extra=_fields(
                "ready",
                duration_ms=round((self.state.ready_at - started) * 1000, 1),
                ready_lag_ms=round((self.state.ready_at - checks_done) * 1000, 3),
            ),
        )

    # -- stop ----------------------------------------------------------------------------

    async def _stop(self, force: asyncio.Event) -> ExitCode:
        cfg = self.config
        loop = asyncio.get_running_loop()
        self.state.phase = Phase.DRAINING  # /readyz answers 503 from here on
        busy = len(self.tracker.connections)
        self.notifier.stopping(f"draining {busy} connection(s)")
        if self.monitor is not None:
            await self.monitor.stop()
        log.info("stopping: %d connection(s) open", busy, extra=_fields("stopping"))
        if cfg.drain_delay > 0:
            log.info("reporting not ready for %.1fs before the drain", cfg.drain_delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(force.wait(), cfg.drain_delay)
        for acceptor in self._acceptors:
            acceptor.stop()
        report = await self.tracker.finish(loop.time() + cfg.shutdown_timeout)
        log.info(
            "drained %d request(s) in %.0f ms (%d idle connection(s) closed, "
            "%d websocket(s) closed with 1001, %d cancelled)",
            report.requests_completed,
            report.duration * 1000,
            report.idle_closed,
            report.websockets_closed,
            len(report.cancelled),
            extra=_fields(
                "drained",
                duration_ms=round(report.duration * 1000, 1),
                requests=report.requests_completed,
                cancelled=len(report.cancelled),
            ),
        )
        self.notifier.status("running cleanup hooks")
        await self._cleanup()
        return ExitCode.OK if report.clean else ExitCode.DRAIN_TIMEOUT

    async def _cleanup(self) -> None:
        for acceptor in self._acceptors:
            acceptor.stop()
        for runner in reversed(self._runners):
            try:
                async with asyncio.timeout(self.config.cleanup_timeout):
                    await runner.cleanup()
            except TimeoutError:
                log.error(
                    "the application's shutdown/cleanup hooks did not finish in %.1fs",
                    self.config.cleanup_timeout,
                    extra=_fields("cleanup"),
                )
        self._runners.clear()
        self.state.phase = Phase.STOPPED

    # -- whole life ----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, force: asyncio.Event) -> ExitCode:
        """Start, serve until ``stop``, drain; ``force`` exits at once at any point."""
        watchdog: asyncio.Task[None] | None = None
        if (interval := self.notifier.watchdog_interval) is not None:
            watchdog = asyncio.create_task(_watchdog(self.notifier, interval))
        life = asyncio.create_task(self._life(stop, force))
        forced = asyncio.create_task(force.wait())
        try:
            await asyncio.wait({life, forced}, return_when=asyncio.FIRST_COMPLETED)
            if life.done():
                return life.result()
            log.warning("second stop signal: exiting at once", extra=_fields("forced"))
            life.cancel()
            return ExitCode.FORCED
        finally:
            forced.cancel()
            if watchdog is not None:
                watchdog.cancel()

    async def _life(self, stop: asyncio.Event, force: asyncio.Event) -> ExitCode:
        start = asyncio.create_task(self._start())
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not start.done():
            log.info("stop requested during start-up", extra=_fields("stopping"))
            self.notifier.stopping("stopped during start-up")
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await start
            await self._cleanup()
            return ExitCode.OK
        try:
            start.result()
        except (AppLoadError, StartupFailed, ConfigError) as exc:
            return await self._start_failed(str(exc))
        except TimeoutError:
            return await self._start_failed(
                f"the application's start-up hooks did not finish in {self.config.start_timeout:g}s"
            )
        await stop.wait()
        return await self._stop(force)

    async def _start_failed(self, reason: str) -> ExitCode:
        log.error("start failed: %s", reason, extra=_fields("start-failed"))
        self.notifier.status(f"start failed: {reason}")
        await self._cleanup()
        return ExitCode.STARTUP


def install_stop_signals(
    loop: asyncio.AbstractEventLoop, stop: asyncio.Event, force: asyncio.Event
) -> None:
    """SIGTERM / SIGINT set ``stop``; a second one sets ``force``. Handlers only set events."""

    def on_signal(signum: int) -> None:
        if stop.is_set():
            force.set()
        else:
            log.info("received %s", signal.Signals(signum).name, extra=_fields("signal"))
            stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


def close_listeners(listeners: Sequence[Listener]) -> None:
    """Close our copies of the sockets; remove unix socket files that we created."""
    for listener in listeners:
        path = listener.sock.getsockname() if listener.sock.family.name == "AF_UNIX" else None
        listener.sock.close()
        if not listener.inherited and isinstance(path, str) and path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


async def serve_in_process(
    config: Config,
    listeners: Sequence[Listener],
    notifier: Notifier,
    before_ready: Callable[[], None] | None = None,
) -> int:
    """Serve in this process until a stop signal (single-process mode, and each worker)."""
    loop = asyncio.get_running_loop()
    stop, force = asyncio.Event(), asyncio.Event()
    install_stop_signals(loop, stop, force)
    worker = Worker(config, listeners, notifier, before_ready=before_ready)
    try:
        code = await worker.run(stop, force)
    finally:
        close_listeners(listeners)
    if code is ExitCode.FORCED:
        # at once: no waiting for handlers to unwind
        logging.shutdown()
        os._exit(code)
    return int(code)
