"""One serving process: sockets in, the application's requests out, a graceful drain on stop.

:class:`Worker` is the whole life of a worker. It is used as-is by the
single-process mode and by each worker process of the supervisor. The order:

1. import and build the application; add sdserve's tracking and health routes;
2. run the app's start-up hooks, then the dependency checks and warm-up steps
   (nothing is accepted yet: early connections wait in the kernel queue);
3. start accepting, then send ``READY=1``;
4. on **stop** (SIGTERM, SIGINT): report not ready, ``STOPPING=1``, keep serving
   for ``drain_delay``, stop accepting, drain (see :mod:`sdserve.drain`), run the
   app's shutdown and cleanup hooks (most recently registered first), and exit;
5. on **retire** (SIGUSR2, sent by the supervisor when a reload or a recycle has
   made this worker redundant): the same drain at once, without the drain delay,
   and ``/readyz`` keeps answering 200 (with ``Connection: close``, unless its
   connection is handed over), because the
   service is ready, only this process is leaving; load balancers do not flap.

With ``handover`` (the default) the drain hands idle keep-alive connections over
instead of closing them (:mod:`sdserve.handover`): a retiring worker to the
supervisor, which passes them to the serving generation; on a stop that is part of a
restart, to systemd's fd store when there is one (directly in single-process mode,
through the supervisor otherwise; a plain stop drains). Connections handed to this
process (over the supervisor's link, or found in the fd store at start) are served
once it is ready.

A start that fails (the app does not import, a start-up hook raises, the checks do
not pass in time) exits with status 3 after the cleanup hooks ran. Its reason and
the application's traceback (file and line) go to the journal once: in
single-process mode from here, under the supervisor in an
``X_SDSERVE_START_FAILED=`` report that the supervisor logs once per generation.

SIGUSR1, in every stage but done, only notes that the coming stop is part of a restart
(:mod:`sdserve.intent`); it is not in the table below.

Signals, in every stage (:data:`SIGNAL_TABLE`; the handlers only set events):

========== ============ ============= =========== ===============
stage      stop         stop again    retire      force (SIGQUIT)
========== ============ ============= =========== ===============
starting   cancel start exit at once  cancel start exit at once
serving    stop         (n/a)         retire      exit at once
delaying   (n/a)        exit at once  end delay   exit at once
draining   not ready    exit at once  ignore      exit at once
cleaning   not ready    exit at once  ignore      exit at once
done       ignore       ignore        ignore      ignore
========== ============ ============= =========== ===============

"Stop again" is a stop signal after a first one (a second ``systemctl stop``, a
second Ctrl-C): exit at once with status 5. A stop after a retire is a first stop:
it turns ``/readyz`` to 503 and never cuts the drain short. SIGHUP reloads nothing
here: in single-process mode it is refused with a line in the journal and in
``STATUS=`` (reloading needs workers: ``workers >= 1``); a worker leaves reloads to
its supervisor.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.metadata
import logging
import os
import random
import signal
import socket
import time
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any

from aiohttp import web

from . import __version__, accesslog, health, metrics, proxies
from .acceptor import Acceptor, reclaim_after, serve_connection
from .activation import ActivationError, Listener, connection_from_fd
from .admission import Admission
from .admission import Settings as AdmissionSettings
from .appload import AppLoadError, StartFailure, build_app, start_failure
from .canary import STATS_FIELD, RequestStats
from .checks import CheckResult, StartupFailed, checks_from_config, registry, wait_until_ready
from .config import Config, ConfigError
from .control import ControlServer
from .drain import Limits, TrackedRequestHandler, Tracker, announce_drain, prepare_app
from .exitcodes import ExitCode
from .handover import Link, close_fds, connection_name
from .intent import RESTART_HINT, hand_over_on_this_stop
from .log import dropped_lines, stop_logging
from .log import fields as _fields
from .loops import running as _loop_name
from .monitor import CheckMonitor
from .notify import Notifier
from .probes import ADMIN_SOCKET, START_CHECKS, StartupProbes, start_checks_to_json
from .state import Phase, WorkerState

log = logging.getLogger("sdserve.worker")

#: why a single process does not reload (SIGHUP and `sdserve reload` say so)
NO_RELOAD = (
    "sdserve serves in a single process (workers = 0), which cannot reload; restart the "
    "service instead, or run with workers >= 1 for zero-gap reloads"
)


class Stage(StrEnum):
    """Where a worker is in its life."""

    STARTING = "starting"
    SERVING = "serving"
    #: stopping: reporting not ready, still accepting, for drain_delay
    DELAYING = "delaying"
    DRAINING = "draining"
    CLEANING = "cleaning"
    DONE = "done"


class Sig(StrEnum):
    """The signals a worker reacts to, as events."""

    STOP = "stop"  # SIGTERM, SIGINT
    STOP_AGAIN = "stop again"  # a stop signal after a first one
    RETIRE = "retire"  # SIGUSR2, from the supervisor
    FORCE = "force"  # SIGQUIT, from the supervisor
    RELOAD = "reload"  # SIGHUP
    RESTART_HINT = "restart hint"  # SIGUSR1, from `sdserve stopping` (ExecStop=)


class Do(StrEnum):
    """What a signal makes a worker do."""

    CANCEL_START = "stopping the start-up"
    STOP = "stopping: drain delay, then drain"
    RETIRE = "retiring: draining at once, still reporting ready"
    END_DELAY = "ending the drain delay"
    NOT_READY = "reporting not ready; the drain goes on"
    FORCE = "exiting at once"
    REFUSE_RELOAD = "reload refused"
    NOTE_RESTART = "noting that the stop to come is part of a restart"
    IGNORE = "ignored"


def _signal_table() -> dict[tuple[Stage, Sig], Do]:
    table: dict[tuple[Stage, Sig], Do] = {}
    for stage in Stage:
        table[stage, Sig.FORCE] = Do.FORCE
        table[stage, Sig.STOP_AGAIN] = Do.FORCE
        table[stage, Sig.RELOAD] = Do.REFUSE_RELOAD
        table[stage, Sig.RESTART_HINT] = Do.NOTE_RESTART
    table[Stage.STARTING, Sig.STOP] = Do.CANCEL_START
    table[Stage.STARTING, Sig.RETIRE] = Do.CANCEL_START
    table[Stage.SERVING, Sig.STOP] = Do.STOP
    table[Stage.SERVING, Sig.RETIRE] = Do.RETIRE
    # delaying is entered by a stop only, so a stop there is always a second one
    table[Stage.DELAYING, Sig.STOP] = Do.FORCE
    table[Stage.DELAYING, Sig.RETIRE] = Do.END_DELAY
    for stage in (Stage.DRAINING, Stage.CLEANING):
        table[stage, Sig.STOP] = Do.NOT_READY  # a first stop after a retire
        table[stage, Sig.RETIRE] = Do.IGNORE
    for sig in Sig:
        table[Stage.DONE, sig] = Do.IGNORE
    return table


#: (stage, signal) -> reaction, for every stage and every signal
SIGNAL_TABLE = _signal_table()

#: the OS signals a worker handles, and the event each is
OS_SIGNALS = {
    signal.SIGTERM: Sig.STOP,
    signal.SIGINT: Sig.STOP,
    signal.SIGUSR2: Sig.RETIRE,
    signal.SIGQUIT: Sig.FORCE,
    signal.SIGHUP: Sig.RELOAD,
    RESTART_HINT: Sig.RESTART_HINT,
}


def _reverse_hooks(app: web.Application) -> None:
    """Run on_shutdown and on_cleanup hooks last-registered-first, like a stack."""
    for hooks in (app.on_shutdown, app.on_cleanup):
        hooks.reverse()


async def _report_stats(notifier: Notifier, stats: RequestStats) -> None:
    """Under a supervisor: the responses' counts, every STATS_PERIOD they changed (a canary
    reload compares them, :mod:`sdserve.canary`)."""
    said = ""
    while True:
        text = stats.encode()
        if text != said:
            notifier.send(f"{STATS_FIELD}={text}")
            said = text
        await asyncio.sleep(STATS_PERIOD)  # the report period itself


async def _watchdog(notifier: Notifier, interval: float) -> None:
    """WATCHDOG=1 from the event loop: a blocked loop stops the pings, and systemd acts."""
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)  # the ping period itself


async def _first(*awaitables: asyncio.Future[Any]) -> None:
    """Wait until the first of these is done (the others keep running)."""
    await asyncio.wait(awaitables, return_when=asyncio.FIRST_COMPLETED)


#: seconds between a supervised worker's reports of its responses' counts
STATS_PERIOD = 0.25


class Worker:
    """The application served on a set of listeners; see the module docstring."""

    def __init__(
        self,
        config: Config,
        listeners: Sequence[Listener],
        notifier: Notifier,
        app: web.Application | None = None,
        *,
        before_ready: Callable[[], None] | None = None,
        supervised: bool = False,
        store_capacity: int = 0,
        probes: StartupProbes | None = None,
    ) -> None:
        """``store_capacity``: systemd's fd store takes this many connections from this
        process on a restart (single-process mode)."""
        self.config = config
        self._before_ready = before_ready
        #: answering the admin socket until the admin application is served (single process)
        self._probes = probes
        self.supervised = supervised
        self.store_capacity = store_capacity if config.handover else 0
        #: the stop to come is part of a restart: said by the supervisor (over the link),
        #: or by `sdserve stopping` (ExecStop=, SIGUSR1) in single-process mode
        self.restart_follows = False
        #: the supervisor's word that the service stops and no restart follows: a retiring
        #: worker drains what it holds instead of handing it up
        self.drain_here = False
        #: the supervisor's link: connections handed over go up, to serve come down
        self.link: Link | None = None
        self._stored = 0
        self._main_factory: Callable[[], TrackedRequestHandler] | None = None
        #: connections to serve once ready (from the fd store, or sent early)
        self._adopt_later: list[socket.socket] = []
        #: accepting has begun: connections handed here are served at once
        self._accepting = False
        self._adopting: set[asyncio.Task[None]] = set()
        self.listeners = list(listeners)
        self.notifier = notifier
        self.state = WorkerState()
        self.stage = Stage.STARTING
        self.stop_seen = False
        limits = Limits(
            header_timeout=config.header_timeout,
            max_body_size=config.max_body_size,
            request_timeout=config.request_timeout,
            max_request_line=config.max_request_line,
            max_header_size=config.max_header_size,
        )
        self.tracker = Tracker(config.idle_grace, config.max_concurrency, limits)
        self.admission = make_admission(config)
        if self.admission is not None:
            self.tracker.admission = self.admission
            self.admission.on_shedding = self._shedding_changed
        if config.max_requests:
            # jitter, so that workers started together are not recycled together
            jitter = random.randint(0, config.max_requests_jitter)
            self.tracker.request_limit = config.max_requests + jitter
            self.tracker.on_limit = self._ask_to_be_recycled
        self._app = app
        self._apps: list[web.Application] = []
        self._runners: list[web.AppRunner] = []
        self._acceptors: list[Acceptor] = []
        self.monitor: CheckMonitor | None = None
        # what the signals set (see SIGNAL_TABLE); the life waits on them
        self._stop = asyncio.Event()
        self._retire = asyncio.Event()
        self._end_delay = asyncio.Event()
        self._force = asyncio.Event()
        self._force_reason = ""
        #: the service's metrics directory (None: no metrics), and this process's metrics
        self.metrics_dir = metrics.directory() if config.metrics else None
        self.metrics: metrics.ServiceMetrics | None = None
        self._request_metrics: metrics.RequestMetrics | None = None
        #: the application's responses by status and latency, for a canary reload
        #: (kept under a supervisor only: it reads them)
        self.counts = RequestStats() if supervised else None
        #: the access log's writer thread (access_log = true)
        self.access_writer: accesslog.AccessWriter | None = None

    def _sample(self) -> None:
        """The gauges and the counts kept elsewhere, into the metrics."""
        if self.metrics is None:
            return
        tracker = self.tracker
        self.metrics.sample(
            len(tracker.inflight),
            len(tracker.connections),
            tracker.rejected,
            dropped_lines() + (self.access_writer.dropped if self.access_writer else 0),
            {name: (r.ok, r.duration) for name, r in self.state.results.items()},
        )
        if self._request_metrics is not None:
            self._request_metrics.set_bytes(tracker.body_bytes_in, tracker.response_bytes)

    async def _sample_metrics(self) -> None:
        while True:
            self._sample()
            await asyncio.sleep(metrics.SAMPLE_PERIOD)  # the sampling period itself

    def _shedding_status(self) -> str:
        adm = self.admission
        return adm.status_text() if adm is not None and adm.shedding else ""

    def _shedding_changed(self, shedding: bool) -> None:
        """STATUS= says so while the worker sheds load (under a supervisor, the service's
        STATUS= shows the serving workers that do)."""
        if self.monitor is not None and self.stage is Stage.SERVING:
            self.monitor.refresh_status()

    def _ask_to_be_recycled(self) -> None:
        log.info(
            "served %d requests: asking the supervisor for a replacement",
            self.tracker.request_limit,
            extra=_fields("recycle"),
        )
        self.notifier.send("X_SDSERVE_RECYCLE=1")

    # -- start ---------------------------------------------------------------------------

    def _handler_kwargs(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "keepalive_timeout": cfg.keepalive_timeout,
            "access_log": None,  # sdserve.accesslog logs instead
            "max_line_size": cfg.max_request_line,
            "max_field_size": cfg.max_header_size,
            "max_headers": cfg.max_headers,
        }

    async def _prepare(self, app: web.Application, admin: bool) -> web.AppRunner:
        show = self.config.health
        if show.enabled and (show.placement in ("both", "admin" if admin else "main")):
            self.tracker.exempt_paths |= health.install(app, self.state, show, admin=admin)
        if self.metrics_dir is not None and (admin or self.config.metrics_on_main):
            path = self.config.metrics_path
            app.router.add_get(path, metrics.handler(self.metrics_dir), allow_head=False)
            self.tracker.exempt_paths.add(path)
        request_factory = self.tracker.install(app)
        cfg = self.config
        if not admin and (cfg.access_log or cfg.trace_ids):
            if cfg.access_log and self.access_writer is None:
                # with log = "json" everything on stdout is JSON lines, the access log too
                json = cfg.access_log_format == "json" or cfg.log == "json"
                target = "json" if json else accesslog.current_target()
                self.access_writer = accesslog.AccessWriter(target)
                self.access_writer.start()
                atexit.register(self.access_writer.stop)
            self.tracker.access = accesslog.AccessLog(
                enabled=cfg.access_log,
                sample=cfg.access_log_sample,
                probes=cfg.access_log_probes,
                exempt=self.tracker.exempt_paths,
                writer=self.access_writer,
            )
        if not admin and cfg.trusted_proxies:
            proxies.install(app, cfg.trusted_proxies)  # outermost: the others see the client
        prepare_app(app)  # its drain event, before aiohttp freezes it
        _reverse_hooks(app)
        kwargs = self._handler_kwargs()
        runner = web.AppRunner(app, handle_signals=False, **kwargs)
        self._apps.append(app)  # its cleanup hooks run even if a start-up hook raises
        await runner.setup()  # the app's on_startup hooks
        self._runners.append(runner)
        server = runner.server
        assert server is not None
        for listener in self.listeners:
            if (listener.name == ADMIN_SOCKET) != admin:
                continue

            def factory(server: web.Server = server) -> TrackedRequestHandler:
                return TrackedRequestHandler(
                    self.tracker,
                    server,
                    main=not admin,
                    request_factory=request_factory,
                    loop=asyncio.get_running_loop(),
                    **kwargs,
                )

            if not admin and self._main_factory is None:
                self._main_factory = factory

            # the admin socket is not limited: health probes must get through a crowd
            limit = 0 if admin else self.config.max_connections
            reclaim = reclaim_after(self.config.keepalive_timeout)
            self._acceptors.append(Acceptor(listener, factory, self.tracker, limit, reclaim))
        return runner

    async def _start(self) -> None:
        cfg = self.config
        started = time.monotonic()
        deadline = started + cfg.start_timeout
        self._say("loading the application")
        app = self._app if self._app is not None else await build_app(cfg.app)
        reg = registry(app)
        checks_from_config(reg, cfg.checks)
        if self.metrics_dir is not None:
            self.metrics = metrics.ServiceMetrics()
            self._request_metrics = metrics.RequestMetrics(
                self.metrics_dir, self.tracker.exempt_paths
            )
            self.tracker.on_response = self._request_metrics.observe
            self.tracker.on_reclaimed = self.metrics.reclaimed.inc
        if self.counts is not None:
            self._keep_counts(self.counts)
        self.state.registry = reg
        self._say("running the application's start-up hooks")
        async with asyncio.timeout(cfg.start_timeout):
            await self._prepare(app, admin=False)
            if self._request_metrics is not None:
                self._request_metrics.known_routes(app)
            if any(ls.name == ADMIN_SOCKET for ls in self.listeners):
                await self._prepare(web.Application(), admin=True)
        if not self.supervised:
            # the admin socket answers from here on with every check's latest result
            # (under a supervisor, a worker serves it only once ready)
            for acceptor in self._acceptors:
                if acceptor.listener.name == ADMIN_SOCKET:
                    acceptor.start()
            self._stop_probes()
        names = ", ".join(reg.checks) or "none"
        self.notifier.status(f"checking dependencies: {names}")
        await wait_until_ready(
            reg,
            self.notifier,
            deadline=deadline,
            retry_initial=cfg.retry_initial,
            retry_max=cfg.retry_max,
            record=self._record_start_checks,
        )
        checks_done = time.monotonic()
        self.monitor = CheckMonitor(self.state, reg, cfg.health, self.notifier)
        self.monitor.also = self._shedding_status
        self.monitor.start()
        if self._before_ready is not None:
            self._before_ready()
        for acceptor in self._acceptors:
            acceptor.start()
        self._accepting = True
        later, self._adopt_later = self._adopt_later, []
        for sock in later:
            self._connect(sock)
        self.state.phase = Phase.READY
        self.state.ready_at = time.monotonic()
        if self.metrics is not None:
            if not self.supervised:
                self.metrics.ready.set(1)
            self._sample()  # its files are open from now on (the checks' gauges too)
        where = ", ".join(f"{ls.name}={ls.address}" for ls in self.listeners)
        self.notifier.ready(f"serving on {where}; sdserve {__version__}")
        loop = _loop_name()
        log.info(
            "ready after %.0f ms (checks passed %.2f ms before READY=1), serving on %s (%s)",
            (self.state.ready_at - started) * 1000,
            (self.state.ready_at - checks_done) * 1000,
            where,
            loop,
            extra=_fields(
                "ready",
                duration_ms=round((self.state.ready_at - started) * 1000, 1),
                ready_lag_ms=round((self.state.ready_at - checks_done) * 1000, 3),
                loop=loop,
            ),
        )

    def snapshot(self) -> dict[str, Any]:
        """This process as ``sdserve status`` shows it (single-process mode)."""
        now = time.monotonic()
        st = self.state
        return service_facts(self.listeners) | {
            "mode": "single process",
            "phase": st.phase.value,
            "status": self.notifier.last_status,
            "age": round(now - st.started_at, 3),
            "ready_for": None if st.ready_at is None else round(now - st.ready_at, 3),
            "connections": len(self.tracker.connections),
        }

    def _record_start_checks(self, results: list[CheckResult]) -> None:
        """One round of the start-up gate: kept for the health endpoints, and under a
        supervisor sent up (its admin socket shows them until a worker is ready)."""
        self.state.record(results)
        if self.supervised:
            self.notifier.send(f"{START_CHECKS}={start_checks_to_json(results)}")

    def _say(self, text: str) -> None:
        """STATUS=, and the start-up probes' answer while they answer."""
        self.notifier.status(text)
        if self._probes is not None:
            self._probes.status = text

    def _stop_probes(self) -> None:
        if self._probes is not None:
            self._probes.stop()
            self._probes = None

    # -- connections handed to this process ---------------------------------------------

    def adopt_fds(self, fds: list[int]) -> None:
        """Serve these connections (fds now owned here): at once if serving, else once
        ready. An fd that is not a connected stream socket is closed and logged."""
        for fd in fds:
            try:
                sock = connection_from_fd(fd, f"a connection handed over (fd {fd})")
            except ActivationError as exc:
                log.warning("%s: closed", exc, extra=_fields("handover"))
                close_fds([fd])
                continue
            self.adopt(sock)

    def adopt(self, sock: socket.socket) -> None:
        if self.stage in (Stage.CLEANING, Stage.DONE):
            self._give_back([sock])  # too late to serve it
        elif not self._accepting or self._main_factory is None:
            self._adopt_later.append(sock)
        else:
            self._connect(sock)

    def _give_back(self, socks: list[socket.socket]) -> int:
        """Connections this worker will not serve go back up the link, untouched, for
        the supervisor to pass on; without a link they are closed. How many went back."""
        link = self.link
        if link is None or link.closed:
            for sock in socks:
                sock.close()
            return 0
        link.give_back([sock.detach() for sock in socks])
        return len(socks)

    def _leave_link(self) -> None:
        """This worker serves nothing more: the supervisor is told to send nothing more
        (what it sent meanwhile comes back up, see :meth:`adopt`)."""
        if self.link is not None:
            self.link.say_leaving()

    def _connect(self, sock: socket.socket) -> None:
        assert self._main_factory is not None
        serve_connection(sock, self._main_factory, self.tracker, self._adopting)

    def note_restart(self) -> None:
        self.restart_follows = True

    def note_drain_here(self) -> None:
        """The service stops during this worker's retirement, and no restart follows: the
        workers it hands its connections to are stopping too, so it hands nothing more
        up and drains what it holds (answers close their connection, idle ones get their
        grace), as a stopping worker does."""
        self.drain_here = True
        if self.tracker.draining and self.tracker.handover is not None:
            log.info(
                "the service stops: handing no more connections over, draining them here",
                extra=_fields("handover"),
            )
            self.tracker.stop_handing_over()

    def close_unserved(self) -> None:
        """The connections never served (the start failed, or was stopped): back to the
        supervisor, if there is one, else closed."""
        later, self._adopt_later = self._adopt_later, []
        if not later:
            return
        back = self._give_back(later)
        if back:
            log.info(
                "gave %d connection(s) never served back to the supervisor",
                back,
                extra=_fields("handover"),
            )
        if closed := len(later) - back:
            log.info(
                "closed %d connection(s) handed over that were never served",
                closed,
                extra=_fields("handover"),
            )

    # -- connections handed from this process -------------------------------------------

    async def _handover_for(
        self, retiring: bool
    ) -> Callable[[list[TrackedRequestHandler]], list[TrackedRequestHandler]] | None:
        """Where this drain hands its idle connections, if anywhere: a retirement to the
        supervisor; a stop only when it is part of a restart (a plain stop releases the
        fd store, which would close them under their clients), to the supervisor (which
        says so first) or to systemd's fd store."""
        if not self.config.handover:
            return None
        if self.link is not None:
            self.link.drain()  # the supervisor's word on this stop came before the signal
            if self.restart_follows or (retiring and not self.drain_here):
                return self._to_link
            return None
        if self.supervised or self.store_capacity <= 0 or retiring:
            return None
        restart = await hand_over_on_this_stop(os.environ, hinted=self.restart_follows, logger=log)
        return self._to_store if restart else None

    def _to_link(self, protos: list[TrackedRequestHandler]) -> list[TrackedRequestHandler]:
        assert self.link is not None
        if self.link.closed:
            return []
        taken, fds = [], []
        for proto in protos:
            fd = _dup_socket(proto)
            if fd is not None:
                taken.append(proto)
                fds.append(fd)
        self.link.send(fds)
        return taken

    def _to_store(self, protos: list[TrackedRequestHandler]) -> list[TrackedRequestHandler]:
        taken = []
        for proto in protos:
            if self._stored >= self.store_capacity:
                break
            fd = _dup_socket(proto)
            if fd is None:
                continue
            self._stored += 1
            name = connection_name(os.getpid(), self._stored)
            if not self.notifier.store_fds(name, [fd]):
                break
            taken.append(proto)
        return taken

    # -- signals -------------------------------------------------------------------------

    def on_signal(self, sig: Sig) -> Do:
        """Dispatch one signal by :data:`SIGNAL_TABLE`; only sets events and logs."""
        if sig is Sig.STOP and self.stop_seen:
            sig = Sig.STOP_AGAIN
        do = SIGNAL_TABLE[self.stage, sig]
        if sig is Sig.STOP:
            self.stop_seen = True
        if do is Do.IGNORE:
            log.debug("%s while %s: ignored", sig.value, self.stage.value)
        elif do is Do.REFUSE_RELOAD:
            self._refuse_reload()
        elif do is Do.FORCE:
            self._force_reason = "second stop signal" if sig is Sig.STOP_AGAIN else "SIGQUIT"
            self._force.set()
        elif do in (Do.CANCEL_START, Do.STOP):
            self._stop.set()
        elif do is Do.RETIRE:
            self._retire.set()
        elif do is Do.END_DELAY:
            self._end_delay.set()
        elif do is Do.NOT_READY:
            # a stop during a retirement: the drain goes on, but /readyz turns 503
            self.state.phase = Phase.DRAINING
        elif do is Do.NOTE_RESTART:
            self.note_restart()
        if do not in (Do.IGNORE, Do.REFUSE_RELOAD):
            log.info(
                "%s signal while %s: %s",
                sig.value,
                self.stage.value,
                do.value,
                extra=_fields("signal"),
            )
        return do

    def _refuse_reload(self) -> None:
        if self.supervised:
            log.info("SIGHUP ignored: the supervisor does the reloads", extra=_fields("signal"))
            return
        log.warning("SIGHUP: reload refused: %s", NO_RELOAD, extra=_fields("reload-refused"))
        self.notifier.status(f"reload refused at {time.strftime('%H:%M:%S')}: {NO_RELOAD}")

    # -- stop ----------------------------------------------------------------------------

    async def _drain(self) -> ExitCode:
        """Stop (or retire): drain delay for a stop, stop accepting, drain, clean up."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        retiring = not self._stop.is_set()
        # /readyz: 503 from here on for a stop; a retiring worker still reports ready
        self.state.phase = Phase.RETIRING if retiring else Phase.DRAINING
        if self.metrics is not None and not self.supervised:
            self.metrics.ready.set(0)
        busy = len(self.tracker.connections)
        verb = "retiring" if retiring else "stopping"
        self.notifier.stopping(f"{verb}: draining {busy} connection(s)")
        if self.monitor is not None:
            await self.monitor.stop()
        log.info("%s: %d connection(s) open", verb, busy, extra=_fields("stopping"))
        if not retiring and cfg.drain_delay > 0:
            self.stage = Stage.DELAYING
            log.info("reporting not ready for %.1fs before the drain", cfg.drain_delay)
            ended = asyncio.ensure_future(self._end_delay.wait())
            try:
                await asyncio.wait({ended}, timeout=cfg.drain_delay)
            finally:
                ended.cancel()
        self.stage = Stage.DRAINING
        for acceptor in self._acceptors:
            acceptor.stop()
        deadline = loop.time() + cfg.shutdown_timeout
        # aiohttp's order: stop accepting, then on_shutdown (where apps end their streams),
        # then wait for the handlers; sdserve's own drain starts first, so that idle
        # connections get their grace (or are handed over) from now
        pending = len(self.tracker.inflight)
        self.tracker.begin_drain(await self._handover_for(retiring))
        for runner in self._runners:
            await announce_drain(runner.app, deadline)
        report = await self.tracker.finish(deadline)
        if self.metrics is not None:
            self.metrics.drained(report.duration, pending, len(report.cancelled))
            self._sample()
        log.info(
            "drained %d request(s) in %.0f ms (%d idle connection(s) closed, %d handed over, "
            "%d websocket(s) closed with 1001, %d cancelled)",
            report.requests_completed,
            report.duration * 1000,
            report.idle_closed,
            report.handed_over,
            report.websockets_closed,
            len(report.cancelled),
            extra=_fields(
                "drained",
                duration_ms=round(report.duration * 1000, 1),
                requests=report.requests_completed,
                cancelled=len(report.cancelled),
                handed_over=report.handed_over,
                idle_closed=report.idle_closed,
            ),
        )
        refused = self.tracker.rejected.copy()
        if self.admission is not None:
            refused.update(self.admission.rejected)
        if refused:
            log.info(
                "refused by limits while serving: %s",
                ", ".join(f"{k} {v}" for k, v in sorted(refused.items())),
                extra=_fields("limits", **refused),
            )
        if reclaimed := self.tracker.reclaimed:
            log.info(
                "%d idle keep-alive connection(s) closed at max_connections to let new clients in",
                reclaimed,
                extra=_fields("limits", reclaimed=reclaimed),
            )
        if (adm := self.admission) is not None and adm.admitted:
            log.info(
                "admission: %d admitted (%d after waiting in the queue), %d refused, "
                "%d of them at their deadline in the queue; concurrency limit %d at the end",
                adm.admitted,
                adm.queued,
                sum(adm.rejected.values()),
                adm.expired,
                adm.limit,
                extra=_fields(
                    "overload",
                    admitted=adm.admitted,
                    queued=adm.queued,
                    expired=adm.expired,
                    limit=adm.limit,
                ),
            )
        self.notifier.status("running cleanup hooks")
        await self._cleanup(drained=True)
        return ExitCode.OK if report.clean else ExitCode.DRAIN_TIMEOUT

    async def _cleanup(self, drained: bool = False) -> None:
        """The apps' cleanup: after a drain only ``on_cleanup`` is left (``on_shutdown`` ran
        as the drain began); otherwise aiohttp's own shutdown and cleanup."""
        self.stage = Stage.CLEANING
        self._leave_link()
        self._stop_probes()
        for acceptor in self._acceptors:
            acceptor.stop()
        started = {runner.app for runner in self._runners}
        for runner in reversed(self._runners):
            try:
                async with asyncio.timeout(self.config.cleanup_timeout):
                    if drained:
                        await runner.app.cleanup()
                    else:
                        await runner.cleanup()
            except TimeoutError:
                log.error(
                    "the application's shutdown/cleanup hooks did not finish in %.1fs",
                    self.config.cleanup_timeout,
                    extra=_fields("cleanup"),
                )
        for app in self._apps:
            if app not in started:
                await self._cleanup_unstarted(app)
        self._runners.clear()
        self._apps.clear()
        self.state.phase = Phase.STOPPED

    async def _cleanup_unstarted(self, app: web.Application) -> None:
        """An app whose start-up hooks raised: run its cleanup hooks anyway, each guarded.

        aiohttp itself unwinds only the ``cleanup_ctx`` contexts that were entered; the
        plain ``on_cleanup`` hooks close what the start-up hooks before the failing one
        opened, so they run too, and a hook that fails on what was never set up is logged.
        """
        try:
            async with asyncio.timeout(self.config.cleanup_timeout):
                for hook in list(app.on_cleanup):
                    try:
                        await hook(app)
                    except Exception as exc:
                        name = getattr(hook, "__qualname__", repr(hook))
                        log.warning(
                            "cleanup hook %s failed after the failed start: %s: %s",
                            name,
                            type(exc).__name__,
                            exc,
                            extra=_fields("cleanup"),
                        )
        except TimeoutError:
            log.error(
                "the application's cleanup hooks did not finish in %.1fs",
                self.config.cleanup_timeout,
                extra=_fields("cleanup"),
            )

    # -- whole life ----------------------------------------------------------------------

    def _keep_counts(self, counts: RequestStats) -> None:
        """A canary's counts of the application's responses (health probes left out):
        kept by the metrics with their own when there are metrics, else by a hook of
        their own."""
        if self._request_metrics is not None:
            self._request_metrics.stats = counts
            return
        exempt = self.tracker.exempt_paths

        def keep(request: web.BaseRequest, status: int, seconds: float) -> None:
            if request.path not in exempt:
                counts.record(status, seconds)

        self.tracker.on_response = keep

    async def run(self) -> ExitCode:
        """Start, serve until stopped or retired, drain; a force exits at once at any point.

        Signals reach the worker through :meth:`on_signal` (see
        :func:`install_signals`).
        """
        watchdog: asyncio.Task[None] | None = None
        if (interval := self.notifier.watchdog_interval) is not None:
            watchdog = asyncio.create_task(_watchdog(self.notifier, interval))
        stats = None
        if self.counts is not None:
            stats = asyncio.create_task(_report_stats(self.notifier, self.counts))
        sampling = None
        if self.metrics_dir is not None:
            sampling = asyncio.create_task(self._sample_metrics())
        life = asyncio.create_task(self._life())
        forced = asyncio.create_task(self._force.wait())
        try:
            await _first(life, forced)
            if life.done():
                return life.result()
            log.warning("%s: exiting at once", self._force_reason, extra=_fields("forced"))
            life.cancel()
            return ExitCode.FORCED
        finally:
            forced.cancel()
            if watchdog is not None:
                watchdog.cancel()
            if stats is not None:
                stats.cancel()
            if sampling is not None:
                sampling.cancel()
            self.stage = Stage.DONE

    async def _life(self) -> ExitCode:
        start = asyncio.create_task(self._start())
        stopped = asyncio.create_task(self._stop.wait())
        retired = asyncio.create_task(self._retire.wait())
        try:
            await _first(start, stopped, retired)
        finally:
            stopped.cancel()
            retired.cancel()
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
            cause = exc.__cause__ if isinstance(exc, AppLoadError) else None
            return await self._start_failed(start_failure(str(exc), cause))
        except TimeoutError:
            limit = self.config.start_timeout
            return await self._start_failed(
                start_failure(f"the application's start-up hooks did not finish in {limit:g}s")
            )
        except Exception as exc:  # an on_startup hook raised: the app's own error
            return await self._start_failed(
                start_failure(f"a start-up hook raised {type(exc).__name__}: {exc}", exc)
            )
        self.stage = Stage.SERVING
        stopped = asyncio.create_task(self._stop.wait())
        retired = asyncio.create_task(self._retire.wait())
        try:
            await _first(stopped, retired)
        finally:
            stopped.cancel()
            retired.cancel()
        return await self._drain()

    async def _start_failed(self, failure: StartFailure) -> ExitCode:
        self.notifier.status(f"start failed: {failure.reason}")
        # under a supervisor, the supervisor logs it once for all its workers
        reported = self.supervised and self.notifier.send(
            f"X_SDSERVE_START_FAILED={failure.to_json()}"
        )
        if not reported:
            log_start_failure(log, failure)
        await self._cleanup()
        return ExitCode.STARTUP


def make_admission(config: Config) -> Admission | None:
    """The admission controller of ``[overload]`` (None when it is off)."""
    ov = config.overload
    if not ov.enabled:
        return None
    settings = AdmissionSettings(
        initial_limit=ov.initial_limit,
        min_limit=ov.min_limit,
        max_limit=ov.max_limit,
        queue_size=ov.queue_size,
        queue_target=ov.queue_target,
        queue_interval=ov.queue_interval,
        critical_paths=ov.critical_paths,
        sheddable_paths=ov.sheddable_paths,
        priority_header=ov.priority_header,
        client_rate=ov.client_rate,
        client_burst=ov.client_burst,
        log_interval=ov.log_interval,
    )
    return Admission(settings, hard_cap=config.max_concurrency)


def _dup_socket(proto: TrackedRequestHandler) -> int | None:
    """A duplicate of the connection's fd, to send; None if it has none any more."""
    transport = proto.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return None
    try:
        return os.dup(sock.fileno())
    except OSError:
        return None


def log_start_failure(logger: logging.Logger, failure: StartFailure, **fields: Any) -> None:
    """One journal entry: the reason, the application's traceback, its file and line."""
    more = dict(fields)
    if failure.file:
        more.update(app_file=failure.file, app_line=failure.line)
    text = f"start failed: {failure.reason}"
    if failure.traceback:
        text += "\n" + failure.traceback
    logger.error("%s", text, extra=_fields("start-failed", **more))


def install_signals(loop: asyncio.AbstractEventLoop, worker: Worker) -> None:
    """Route :data:`OS_SIGNALS` to ``worker.on_signal``. Handlers only set events."""
    for signum, sig in OS_SIGNALS.items():
        loop.add_signal_handler(signum, worker.on_signal, sig)


def service_facts(listeners: Sequence[Listener]) -> dict[str, Any]:
    """What ``sdserve status`` shows of any sdserve process: who, which version, where."""
    try:
        version = importlib.metadata.version("sdserve")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "pid": os.getpid(),
        "version": version,
        "sockets": [{"name": ls.name, "address": ls.address} for ls in listeners],
    }


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
    *,
    before_ready: Callable[[], None] | None = None,
    supervised: bool = False,
    connections: Sequence[tuple[str, socket.socket]] = (),
    store_capacity: int = 0,
    link: socket.socket | None = None,
    probes: StartupProbes | None = None,
) -> int:
    """Serve in this process until a stop signal (single-process mode, and each worker).

    ``connections`` came from systemd's fd store: they are taken out of it at once and
    served once ready. ``link`` is the supervisor's (a worker). ``probes`` answer the
    admin socket until the admin application takes over (single-process mode)."""
    loop = asyncio.get_running_loop()
    # a single process: its own metrics directory, before the application is imported
    own_metrics = metrics.setup_directory() if config.metrics and not supervised else None
    worker = Worker(
        config,
        listeners,
        notifier,
        before_ready=before_ready,
        supervised=supervised,
        store_capacity=store_capacity,
        probes=probes,
    )
    install_signals(loop, worker)
    for name, sock in connections:
        # out of the store at once: a connection systemd still holds never really closes
        notifier.remove_stored(name)
        worker.adopt(sock)
    if link is not None:
        worker.link = Link(
            link,
            worker.adopt_fds,
            on_restarting=worker.note_restart,
            on_drain_here=worker.note_drain_here,
        )
    control = None
    if not supervised:  # `sdserve reload` hears why there is no reload here
        control = ControlServer(
            lambda waiter: waiter.finish("refused", NO_RELOAD), on_status=worker.snapshot
        )
        await control.start()
    code: ExitCode | None = None  # None: run() raised
    try:
        code = await worker.run()
    finally:
        if control is not None:
            control.close()
        close_listeners(listeners)
        worker.close_unserved()
        if worker.link is not None:
            if code is not None and code is not ExitCode.FORCED:
                # nothing may wait in the link's buffer when it closes: the supervisor's
                # BYE says nothing more comes (bounded: it may be gone)
                await worker.link.leave(timeout=1.0)
            worker.link.flush_blocking(timeout=1.0)  # connections handed over, bounded
            worker.link.close()
            if lost := worker.link.lost:
                log.error(
                    "%d connection(s) handed over were lost: the supervisor did not "
                    "take them in time",
                    lost,
                    extra=_fields("handover"),
                )
        notifier.flush(timeout=1.0)  # the last messages (a start failure...), bounded
        if own_metrics is not None:
            metrics.remove_directory(own_metrics)
    if code is ExitCode.FORCED:
        # at once: no waiting for handlers to unwind
        stop_logging(timeout=0.5)
        os._exit(code)
    return int(code)
