"""Health endpoints: ``/livez``, ``/readyz``, ``/startupz`` (paths and placement configurable).

In the style of the Kubernetes API server: 200 when healthy, 503 when not; the
plain-text body is ``ok``, or one ``[+]name ok`` / ``[-]name failed: ...`` line
per check followed by ``<endpoint> check passed|failed``. ``?verbose`` lists
every check even when all pass. ``?exclude=NAME`` (repeatable, or
comma-separated) leaves a check out; the ``phase`` check of ``/readyz`` cannot be
excluded, so ``/readyz`` is 503 from the first moment of a drain whatever the
query says.

JSON follows the IETF health-check draft (``application/health+json``): served
when the ``Accept`` header names ``application/health+json`` or the query has
``format=json``. ``status`` is ``pass``, ``warn`` (still 200) or ``fail`` (503);
``checks`` maps ``NAME:responseTime`` (or ``NAME:lag`` / ``NAME:state``) to a
one-element list with ``componentId``, ``componentType``, ``observedValue``,
``observedUnit``, ``status``, ``time`` and ``output``. JSON always lists every
check (``?verbose`` is for the text form); ``?format=text`` forces text.

Details (check outputs, latencies, times) are shown on the admin socket, or on
the main socket when ``health.details_on_main`` is set. Elsewhere the names and
the pass/fail of each check are shown, with "reason withheld". Every body is
redacted of the registry's secrets.

What the endpoints test:

- ``/livez``: sdserve itself. ``loop``: the event-loop heartbeat (a stall longer
  than ``health.loop_stall``, reported while it lasts and for ``health.stall_hold``
  after); ``monitor``: the background check tasks did not crash. Never a dependency.
- ``/readyz``: ``phase`` (ready, not starting or draining) and every registered
  check: a critical check past its failure threshold fails; a critical check
  failing below the threshold, or a failing optional check, warns.
- ``/startupz``: ``started``: start-up (checks and warm-up) finished.

Probes never run a check: they read the results kept in :class:`WorkerState`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, cast

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .config import ConfigError, HealthConfig
from .healthreport import (
    HEALTH_JSON,
    NOT_EXCLUDABLE,
    Entry,
    ProbeQuery,
    Status,
    overall,
    render_json,
    render_text,
    respond,
)
from .monitor import tick_period
from .state import Phase, WorkerState

__all__ = [
    "HEALTH_JSON",
    "NOT_EXCLUDABLE",
    "Entry",
    "Status",
    "install",
    "liveness",
    "overall",
    "readiness",
    "render_json",
    "render_text",
    "startup",
]

# -- what each endpoint checks ---------------------------------------------------------------


def liveness(state: WorkerState, config: HealthConfig, now: float | None = None) -> list[Entry]:
    """sdserve's own health: the event loop turns, the monitor runs."""
    now = time.monotonic() if now is None else now
    loop = state.loop
    entries: list[Entry] = []
    if loop.last_tick is None:
        entries.append(Entry("loop", "pass", "not measured (before start)", "system"))
    else:
        late = max(0.0, now - loop.last_tick - tick_period(config))
        lag = max(loop.lag, late)
        if late > config.loop_stall:
            entries.append(
                Entry(
                    "loop",
                    "fail",
                    f"event loop stalled for {late:.1f}s",
                    "system",
                    late * 1000,
                    "lag",
                    time.time(),
                )
            )
        elif loop.stall is not None and now - loop.stall[0] < config.stall_hold:
            ended, duration = loop.stall
            entries.append(
                Entry(
                    "loop",
                    "fail",
                    f"event loop stalled for {duration:.1f}s, {now - ended:.1f}s ago",
                    "system",
                    duration * 1000,
                    "lag",
                    loop.stall_wall,
                )
            )
        else:
            entries.append(Entry("loop", "pass", "", "system", lag * 1000, "lag", time.time()))
    if state.monitor_error is not None:
        entries.append(Entry("monitor", "fail", state.monitor_error, "system"))
    else:
        entries.append(Entry("monitor", "pass", "", "system"))
    return entries


def readiness(state: WorkerState, config: HealthConfig) -> list[Entry]:
    """Ready to take traffic: the phase, then every registered check."""
    entries = [
        Entry(
            "phase",
            "pass" if state.phase.takes_traffic else "fail",
            state.phase.value,
            "system",
            measurement="state",
        )
    ]
    reg = state.registry
    if reg is None:
        return entries
    for name, check in reg.checks.items():
        result = state.results.get(name)
        if result is None:
            entries.append(
                Entry(name, "warn", "not run yet", check.component_type, measurement="state")
            )
            continue
        streak = state.streaks.get(name, 0)
        if result.ok:
            status: Status = "pass"
            output = result.output
        elif check.critical and state.phase is Phase.STARTING:
            status = "fail"
            output = f"{result.output or 'failed'} (the start waits for it: {-streak} attempt(s))"
        elif check.critical and name in state.unready:
            status = "fail"
            output = f"{result.output or 'failed'} ({-streak} failure(s) in a row)"
        elif check.critical:
            status = "warn"
            output = (
                f"{result.output or 'failed'} "
                f"({-streak} of {config.fail_threshold} failures before not ready)"
            )
        else:
            status = "warn"
            output = f"{result.output or 'failed'} (optional)"
        if result.ok and name in state.unready:  # recovering: not enough passes yet
            status = "fail"
            output = f"recovering: {streak} of {config.pass_threshold} passes"
        entries.append(
            Entry(
                name,
                status,
                output,
                check.component_type,
                result.duration * 1000,
                "responseTime",
                result.finished_at,
            )
        )
    return entries


def startup(state: WorkerState) -> list[Entry]:
    if state.started:
        return [Entry("started", "pass", "", "system", measurement="state")]
    return [Entry("started", "fail", state.phase.value, "system", measurement="state")]


def _has_route(app: web.Application, path: str) -> bool:
    """Whether ``app`` answers GET ``path`` with a route of its own (a plain path)."""
    for route in app.router.routes():
        resource = route.resource
        taken = resource is not None and resource.canonical == path
        if taken and route.method in ("GET", "HEAD", "*"):
            return True
    return False


def install(
    app: web.Application, state: WorkerState, config: HealthConfig, *, admin: bool
) -> set[str]:
    """Add the health routes to ``app``; returns their paths (exempt from load shedding).

    ``admin`` is true for the admin socket's application, where details are shown.
    """
    details = admin or config.details_on_main

    def answer(request: web.Request, endpoint: str, entries: list[Entry]) -> web.Response:
        query = ProbeQuery.parse(
            lambda name: request.query.getall(name, []), request.headers.get("Accept", "")
        )
        code, body, ctype = respond(endpoint, entries, query, details=details)
        if state.registry is not None and state.registry.secrets:
            body = state.registry.redact(body)
        return web.Response(
            status=code, text=body, content_type=ctype, headers={"Cache-Control": "no-store"}
        )

    async def livez(request: web.Request) -> web.Response:
        return answer(request, "livez", liveness(state, config))

    async def readyz(request: web.Request) -> web.Response:
        return answer(request, "readyz", readiness(state, config))

    async def startupz(request: web.Request) -> web.Response:
        return answer(request, "startupz", startup(state))

    taken = [
        f"health.{key}: the application already has a route GET {path}; set health.{key} "
        "to a free path, or health.enabled = false to serve your own"
        for key, path in (
            ("livez_path", config.livez_path),
            ("readyz_path", config.readyz_path),
            ("startupz_path", config.startupz_path),
        )
        if _has_route(app, path)
    ]
    if taken:
        raise ConfigError(taken)
    ours = {
        "livez_path": (config.livez_path, livez),
        "readyz_path": (config.readyz_path, readyz),
        "startupz_path": (config.startupz_path, startupz),
    }
    for path, handler in ours.values():
        app.router.add_get(path, handler)
    # routes that match more than their own path (a pattern, static files, a
    # sub-application) can answer a health path before sdserve's: checked first thing
    # at start, with the router as it will serve
    app.on_startup.insert(0, lambda app: _check_answered_by_us(app, ours))
    return {config.livez_path, config.readyz_path, config.startupz_path}


class _Probe(NamedTuple):
    method: str
    rel_url: URL
    headers: CIMultiDict[str]
    host: str


async def _check_answered_by_us(
    app: web.Application, ours: Mapping[str, tuple[str, Callable[[web.Request], Any]]]
) -> None:
    """A :class:`ConfigError` naming each ``health.*_path`` that the application's own
    routes answer, as aiohttp's router resolves a GET of it."""
    taken = []
    for key, (path, handler) in ours.items():
        # what the router reads of a request: its method, path, and headers (domains)
        request = cast(web.Request, _Probe("GET", URL.build(path=path), CIMultiDict(), ""))
        try:
            if (await app.router.resolve(request)).handler is handler:
                continue
        except AttributeError:  # a custom routing rule that reads more: cannot tell
            continue
        claims = "its routes"
        for resource in app.router.resources():
            found = None
            with contextlib.suppress(AttributeError):
                found, _allowed = await resource.resolve(request)
            if found is not None:
                kind = type(resource).__name__.removesuffix("Resource")
                claims = f"its route {resource.canonical or '/'} ({kind})"
                break
        taken.append(
            f"health.{key}: the application answers GET {path} with {claims}, before "
            f"sdserve's; set health.{key} to a path it does not route, or "
            "health.enabled = false to serve your own"
        )
    if taken:
        raise ConfigError(taken)
