"""Dependency checks: the protocol, the registry kept on the application, and the runners.

An application registers checks with :func:`add_check` (or from the config file,
``[checks.NAME]`` sections; built-in checks are in :mod:`sdserve.builtin_checks`)
and warm-up steps with :func:`add_warmup`. A check is an async callable: it
passes when it returns anything but ``False`` and fails when it raises or returns
``False``. A returned string is kept as its output; :class:`CheckFailed` fails
with just its message. Outputs are redacted of ``CheckRegistry.secrets``.

:func:`run_check` never waits longer than the check's timeout, even for a check
that ignores cancellation: such a run is abandoned (and reaped when it ends).

Blocking calls (``stat`` on a network mount, the system resolver) go through a
:class:`CheckThread`: a thread of the check's own, one at a time. A call that does
not return within the timeout leaves its thread behind, and the check reports
itself hung until that thread returns, instead of starting one more thread at every
interval. These threads are not the event loop's default executor, so a hung mount
or resolver cannot starve ``loop.getaddrinfo`` (and the HTTP and TCP checks that
need it), and they never keep the process from exiting.
:func:`wait_until_ready` is the start-up gate: it retries failing critical checks
with backoff until they all pass or the start deadline passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger("sdserve.checks")
#: how a run past its time limit is described (the start-up gate tells it apart)
_TIMED_OUT = "timed out after "

CheckFunc = Callable[[], Awaitable[object]]
T = TypeVar("T")


@dataclass(frozen=True)
class Check:
    """One dependency check."""

    name: str
    func: CheckFunc
    #: a run that takes longer has failed
    timeout: float = 5.0
    #: a critical check gates READY=1 and readiness; an optional one only warns
    critical: bool = True
    #: re-run in the background after start (False: a start-up check only)
    continuous: bool = True
    #: ``componentType`` in the health+json output (``datastore``, ``system``, ...)
    component_type: str = "component"
    #: re-run interval after start; None takes the configured ``health.interval``
    interval: float | None = None


@dataclass(frozen=True)
class Warmup:
    """A step that must finish before READY=1 (fill a pool, load a cache...)."""

    name: str
    func: CheckFunc
    timeout: float = 30.0


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    output: str
    duration: float
    #: wall-clock time the run finished (seconds since the epoch)
    finished_at: float
    critical: bool = True


@dataclass
class CheckRegistry:
    """The checks and warm-up steps of one application (see :func:`registry`)."""

    checks: dict[str, Check] = field(default_factory=dict)
    warmups: list[Warmup] = field(default_factory=list)
    #: strings that must never appear in any output (passwords from DSNs...)
    secrets: set[str] = field(default_factory=set)
    #: runs that timed out and ignored cancellation; kept until they end
    abandoned: set[asyncio.Task[object]] = field(default_factory=set)
    #: the abandoned run of each check while it lasts: no new run starts until it ends
    hanging: dict[str, asyncio.Task[object]] = field(default_factory=dict)

    def add(self, check: Check) -> Check:
        if check.name in self.checks:
            raise ValueError(f"a check named {check.name!r} is already registered")
        if check.timeout <= 0:
            raise ValueError(f"check {check.name!r}: timeout must be greater than 0")
        if check.interval is not None and check.interval <= 0:
            raise ValueError(f"check {check.name!r}: interval must be greater than 0")
        self.checks[check.name] = check
        return check

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            if secret:
                text = text.replace(secret, "***")
        return text


@functools.cache
def _checks_key() -> web.AppKey[CheckRegistry]:
    """The app key of the registry (``app[key]``), made on first use: this module is
    imported to validate the config's check tables, before aiohttp is."""
    from aiohttp import web

    return web.AppKey("sdserve.checks", CheckRegistry)


def registry(app: web.Application) -> CheckRegistry:
    """The application's check registry, created on first use."""
    key = _checks_key()
    reg = app.get(key)
    if reg is None:
        reg = CheckRegistry()
        app[key] = reg
    return reg


def add_check(
    app: web.Application,
    name: str,
    func: CheckFunc,
    *,
    timeout: float = 5.0,
    critical: bool = True,
    continuous: bool = True,
    component_type: str = "component",
    interval: float | None = None,
) -> Check:
    """Register a dependency check on ``app``; see :class:`Check` for the parameters."""
    return registry(app).add(
        Check(name, func, timeout, critical, continuous, component_type, interval)
    )


def add_warmup(
    app: web.Application, name: str, func: CheckFunc, *, timeout: float = 30.0
) -> Warmup:
    """Register a warm-up step: runs once, after the checks pass and before READY=1."""
    step = Warmup(name, func, timeout)
    registry(app).warmups.append(step)
    return step


#: the OS name of check threads (``top -H``, ``/proc/PID/task/*/comm``)
THREAD_NAME = "sdserve-check"
_PR_SET_NAME = 15


def _name_this_thread(name: str) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


class CheckThread:
    """Runs the blocking calls of one check in a daemon thread of its own, one at a time.

    While a call has not returned (a hung NFS mount, a resolver that does not answer),
    :meth:`call` fails at once, saying since when, and starts no other thread.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        #: ``time.monotonic()`` of the call that has not returned yet, or None
        self.busy_since: float | None = None

    async def call(self, func: Callable[..., T], *args: Any) -> T:
        if self.busy_since is not None:
            hung = time.monotonic() - self.busy_since
            raise CheckFailed(
                f"hung: {self.what} has not returned for {hung:.0f}s "
                "(its thread is waited for, no other is started)"
            )
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()

        def deliver(result: T | None, error: BaseException | None) -> None:
            if done.done():  # the wait was given up (the check's timeout)
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result)  # type: ignore[arg-type]

        def work() -> None:
            _name_this_thread(THREAD_NAME)
            result: T | None = None
            error: BaseException | None = None
            try:
                result = func(*args)
            except BaseException as exc:  # raised in the loop, by the caller
                error = exc
            finally:
                self.busy_since = None
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(deliver, result, error)

        self.busy_since = time.monotonic()
        threading.Thread(target=work, name=f"sdserve-check {self.what}", daemon=True).start()
        return await done


class CheckFailed(Exception):
    """Raised by a check to fail with a message (shown as is, without the class name)."""


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, CheckFailed):
        return text or "failed"
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def _reaper(name: str, reg: CheckRegistry | None) -> Callable[[asyncio.Task[object]], None]:
    def reap(task: asyncio.Task[object]) -> None:
        if reg is not None and reg.hanging.get(name) is task:
            del reg.hanging[name]
        if task.cancelled():
            outcome = "cancelled"
        elif (exc := task.exception()) is not None:
            outcome = _describe(exc)
        else:
            outcome = "a result"
        if reg is not None:
            outcome = reg.redact(outcome)
        # ending on the cancellation is the usual case; anything else is worth a line
        level = logging.DEBUG if task.cancelled() else logging.INFO
        log.log(level, "the abandoned run of check %s ended with %s", name, outcome)

    return reap


def _abandon(task: asyncio.Task[object], name: str, reg: CheckRegistry | None) -> None:
    """Cancel a run and stop waiting for it; it is kept (and reaped) until it really ends."""
    task.cancel()
    if task.done():
        return
    if reg is not None:
        reg.abandoned.add(task)
        reg.hanging[name] = task
        task.add_done_callback(reg.abandoned.discard)
    task.add_done_callback(_reaper(name, reg))


async def run_check(
    check: Check, reg: CheckRegistry | None = None, limit: float | None = None
) -> CheckResult:
    """Run ``check`` once; the result is ready within its timeout whatever the check does.

    With ``reg``, only one run of a check is in flight at a time: while an
    abandoned run (one that timed out and ignored cancellation) is still going,
    the check fails at once without starting another.
    """
    limit = check.timeout if limit is None else min(limit, check.timeout)
    started = time.monotonic()
    if reg is not None and check.name in reg.hanging:
        return CheckResult(
            check.name,
            False,
            "the previous run is still running (it ignored cancellation)",
            0.0,
            time.time(),
            check.critical,
        )
    try:
        task: asyncio.Task[object] = asyncio.ensure_future(check.func())
        task.set_name(f"sdserve-check-run:{check.name}")
    except Exception as error:  # the callable raised before returning an awaitable
        output = _describe(error) if reg is None else reg.redact(_describe(error))
        return CheckResult(check.name, False, output, 0.0, time.time(), check.critical)
    try:
        done, _ = await asyncio.wait({task}, timeout=limit)
    except asyncio.CancelledError:
        _abandon(task, check.name, reg)
        raise
    duration = time.monotonic() - started
    if not done:
        _abandon(task, check.name, reg)
        ok, output = False, f"{_TIMED_OUT}{limit:g}s"
    elif task.cancelled():
        ok, output = False, "cancelled"
    elif (exc := task.exception()) is not None:
        ok, output = False, _describe(exc)
    else:
        value = task.result()
        ok = value is not False
        output = value if isinstance(value, str) else ("" if ok else "returned False")
    if reg is not None:
        output = reg.redact(output)
    return CheckResult(check.name, ok, output, duration, time.time(), check.critical)


def checks_from_config(
    reg: CheckRegistry,
    tables: Mapping[str, Mapping[str, Any]],
    environ: Mapping[str, str] | None = None,
) -> None:
    """Register the ``[checks.NAME]`` tables of the config file as built-in checks.

    Every problem of every table is reported at once in one
    :class:`sdserve.config.ConfigError`, each naming ``checks.NAME.key``. Secrets
    are read from ``environ`` (default ``os.environ``) or from
    ``$CREDENTIALS_DIRECTORY`` and added to ``reg.secrets``. See
    :mod:`sdserve.builtin_checks` for the keys of each type.
    """
    from .builtin_checks import register_tables

    register_tables(reg, tables, environ)


def table_problems(
    tables: Mapping[str, Mapping[str, Any]], environ: Mapping[str, str] | None = None
) -> list[str]:
    """Every problem of the ``[checks.NAME]`` tables (none: they are valid), each naming
    ``checks.NAME.key``: the validation of :func:`checks_from_config`, registering nothing.

    :func:`sdserve.config.load_config` takes it (``check_tables=``), so that a config
    file's problems, top-level and of its checks, are reported together."""
    from .config import ConfigError

    try:
        checks_from_config(CheckRegistry(), tables, environ)
    except ConfigError as exc:
        return list(exc.problems)
    return []


class StartupFailed(Exception):
    """Critical checks did not pass, or a warm-up step failed, before the start deadline."""

    def __init__(self, message: str, failing: Iterable[CheckResult]) -> None:
        super().__init__(message)
        self.failing = tuple(failing)


class Reporter(Protocol):
    """Where the start-up gate reports progress (the notifier, in practice)."""

    def status(self, text: str) -> object: ...

    def extend_timeout(self, seconds: float) -> object: ...


def _summary(results: Iterable[CheckResult]) -> str:
    return ", ".join(f"{r.name} ({r.output or 'failed'})" for r in results)


def _log_result(result: CheckResult, attempt: int) -> None:
    fields = {
        "SDSERVE_PHASE": "checks",
        "SDSERVE_CHECK": result.name,
        "SDSERVE_CHECK_OK": int(result.ok),
        "SDSERVE_DURATION_MS": round(result.duration * 1000, 1),
    }
    if result.ok:
        log.info(
            "check %s passed in %.1f ms (attempt %d)",
            result.name,
            result.duration * 1000,
            attempt,
            extra=fields,
        )
    else:
        level = logging.WARNING if result.critical else logging.INFO
        log.log(
            level,
            "check %s failed after %.1f ms (attempt %d): %s",
            result.name,
            result.duration * 1000,
            attempt,
            result.output,
            extra=fields,
        )


async def wait_until_ready(
    reg: CheckRegistry,
    reporter: Reporter,
    *,
    deadline: float,
    retry_initial: float,
    retry_max: float,
    record: Callable[[list[CheckResult]], object] | None = None,
) -> list[CheckResult]:
    """The start-up gate: run every check, retry the failing critical ones until they pass.

    ``record`` gets the results of each round as it ends (the health endpoints show
    them while the start waits).

    ``deadline`` is a ``time.monotonic()`` value. While critical checks are being
    retried, STATUS= names them and EXTEND_TIMEOUT_USEC= keeps systemd waiting,
    never beyond ``deadline``. Raises :class:`StartupFailed` naming the failing checks.
    Returns the last result of every check.
    """
    results: dict[str, CheckResult] = {}
    pending = list(reg.checks.values())
    attempt = 0
    pause = retry_initial
    while pending:
        attempt += 1
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        runs = await asyncio.gather(*(run_check(c, reg, limit=remaining) for c in pending))
        for check, result in zip(pending, runs, strict=True):
            cut = remaining < check.timeout and result.output.startswith(_TIMED_OUT)
            if not (cut and result.name in results):
                # a retry cut short by the start deadline says nothing of the dependency:
                # the reason given stays the one of the last attempt that ran its course
                results[result.name] = result
            _log_result(result, attempt)
        if record is not None:
            record(list(runs))
        # optional checks are tried once at start; the background monitor takes them on
        pending = [c for c, r in zip(pending, runs, strict=True) if not r.ok and c.critical]
        if not pending:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        waiting = [results[c.name] for c in pending]
        reporter.status(
            f"waiting for {_summary(waiting)}; attempt {attempt}, {remaining:.0f}s left"
        )
        next_try = min(pause, remaining)
        longest = max(c.timeout for c in pending)
        # keep systemd waiting through the next attempt, but never past our own deadline
        reporter.extend_timeout(min(remaining, next_try + longest) + 5.0)
        await asyncio.sleep(next_try)  # retry backoff, not synchronisation
        pause = min(pause * 2, retry_max)
    failing = [results[c.name] for c in pending]
    if failing:
        raise StartupFailed(f"critical checks did not pass: {_summary(failing)}", failing)
    for step in reg.warmups:
        remaining = deadline - time.monotonic()
        reporter.status(f"warming up: {step.name}")
        result = await run_check(
            Check(step.name, step.func, step.timeout), reg, limit=max(remaining, 0.001)
        )
        _log_result(result, 1)
        if not result.ok:
            raise StartupFailed(f"warm-up step failed: {_summary([result])}", [result])
    return list(results.values())


def run_bounded(
    main: Coroutine[Any, Any, T],
    *,
    grace: float,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
) -> T:
    """Like :func:`asyncio.run`, but waits at most ``grace`` seconds for leftover tasks.

    ``asyncio.run`` cancels the tasks still running when ``main`` returns and then
    waits for them without a limit, so one check run that ignores cancellation
    keeps the process from ever exiting. Here the leftovers get ``grace`` seconds
    after their cancellation; those still running then are named in a log line
    and left behind when the loop closes. ``loop_factory`` makes the loop (uvloop's, say).
    """
    loop = loop_factory()
    try:
        asyncio.set_event_loop(loop)
        result = loop.run_until_complete(main)
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            _, stuck = loop.run_until_complete(asyncio.wait(pending, timeout=grace))
            if stuck:
                log.error(
                    "%d task(s) ignored cancellation for %.1fs and are left behind: %s",
                    len(stuck),
                    grace,
                    ", ".join(sorted(t.get_name() for t in stuck)),
                )
        loop.run_until_complete(loop.shutdown_asyncgens())
        return result
    finally:
        asyncio.set_event_loop(None)
        loop.close()
