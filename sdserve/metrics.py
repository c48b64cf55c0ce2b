"""Prometheus metrics for the whole service, continuous across reloads and worker deaths.

Every process of a service (the supervisor and each worker, or the one process with
``workers = 0``) writes its numbers to files in one private directory, in
prometheus-client's multiprocess format (``PROMETHEUS_MULTIPROC_DIR``, created by
:func:`setup_directory` for each start of the service, removed at its end). ``/metrics``
(on the admin socket; on the main one with ``metrics_on_main``) merges them with
prometheus-client's :class:`MultiProcessCollector`: whichever process answers, the
numbers cover the whole service.

Why files: a counter is in its file as soon as it is counted (the file is a shared
memory map, written in place), so a worker killed with SIGKILL loses nothing it had
counted. When a worker has exited, the supervisor folds its counters and histograms
into ``*_aggregate.db`` and deletes its files (:func:`retire`), so the counters never
go backwards and the files (and series) do not pile up with the workers a long life
replaces; gauges of a dead worker simply go. Readers and the fold exclude each other
with a lock on the directory, so a scrape never sees a worker's counts twice or not at
all.

The request path: each response costs a dictionary look-up (by the matched route
object, so no route template is computed), a bisection and three additions to doubles
in a memory map (:class:`RequestMetrics`, no lock, no system call). The byte
counters are the tracker's plain integers (:class:`sdserve.drain.Tracker`), written to
the map every :data:`SAMPLE_PERIOD` and once more after a drain: a worker killed
outright loses at most its last period of byte counts, never a request's count.
prometheus-client's own objects (with a lock and a file write per change) serve the
rest, which changes seldom: drains, reloads, restarts, checks, and gauges sampled every
:data:`SAMPLE_PERIOD`.

Labels: requests by ``method`` (known methods, else ``other``), ``route`` (the route's
template, ``request.match_info.route.resource.canonical``; ``none`` for a request that
matched no route: never the raw path) and ``code`` (the status class, ``2xx``...).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import fcntl
import json
import mmap
import os
import re
import shutil
import struct
import tempfile
from collections import Counter as Tally
from collections.abc import Callable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiohttp import web

    from .canary import RequestStats

#: the environment variable prometheus-client reads at import (its multiprocess mode)
ENV_DIR = "PROMETHEUS_MULTIPROC_DIR"
#: seconds between a worker's samples of its gauges (in flight, connections, rejections)
SAMPLE_PERIOD = 0.5
#: request duration buckets, seconds
DURATION_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    float("inf"),
)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT"})
_LOCK_NAME = "lock"
_PID_FILE = re.compile(r"^(counter|histogram|summary|gauge_[a-z]+)_(?:hot)?(\d+)\.db$")
_DOUBLE = struct.Struct("d")

REQUESTS = "sdserve_requests"
REQUESTS_HELP = "responses of the application, by method, route template and status class"
DURATION = "sdserve_request_duration_seconds"
DURATION_HELP = "time from the request's headers to the handler's response"
BYTES_IN = "sdserve_request_body_bytes"
BYTES_IN_HELP = "request body bytes (by Content-Length), of the application's sockets"
BYTES_OUT = "sdserve_response_bytes"
BYTES_OUT_HELP = "response bytes written (headers included), of the application's sockets"


def setup_directory(environ: dict[str, str] | os._Environ[str] = os.environ) -> Path:
    """A fresh private directory for this start of the service, in ``environ`` (and so
    in every worker's) before prometheus-client is imported. In ``RUNTIME_DIRECTORY``
    (systemd's ``RuntimeDirectory=``) when there is one, else in the temporary one."""
    base = environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or tempfile.gettempdir()
    path = Path(tempfile.mkdtemp(prefix="sdserve-metrics-", dir=base))
    environ[ENV_DIR] = str(path)
    (path / _LOCK_NAME).touch()
    return path


def remove_directory(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def directory() -> Path | None:
    value = os.environ.get(ENV_DIR)
    return Path(value) if value else None


@contextlib.contextmanager
def _locked(path: Path, exclusive: bool) -> Iterator[None]:
    fd = os.open(path / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def render(path: Path) -> bytes:
    """The whole service's metrics in the Prometheus text format (blocking file reads:
    call it in a thread)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))  # type: ignore[no-untyped-call]
    with _locked(path, exclusive=False):
        return generate_latest(registry)


def retire(path: Path, pid: int) -> None:
    """Fold an exited process's counters and histograms into the aggregate files, and
    delete its files (the supervisor calls it once it has reaped a worker)."""
    from prometheus_client.mmap_dict import MmapedDict

    with _locked(path, exclusive=True):
        mine = []
        for entry in os.scandir(path):
            found = _PID_FILE.match(entry.name)
            if found and int(found.group(2)) == pid:
                mine.append((found.group(1), Path(entry.path)))
        for kind, file in mine:
            if not kind.startswith("gauge"):
                read = MmapedDict.read_all_values_from_file
                values = list(read(str(file)))  # type: ignore[no-untyped-call]
                if values:
                    total = MmapedDict(str(path / f"{kind}_aggregate.db"))  # type: ignore[no-untyped-call]
                    try:
                        for key, value, _stamp, _pos in values:
                            before, _ = total.read_value(key)  # type: ignore[no-untyped-call]
                            total.write_value(key, before + value, 0.0)  # type: ignore[no-untyped-call]
                    finally:
                        total.close()  # type: ignore[no-untyped-call]
            file.unlink()


# -- the request path's counters ---------------------------------------------------------


class HotFile:
    """One process's values in prometheus-client's multiprocess file format, written in
    place through a memory view of doubles (the format: a 4-byte used length, then
    entries of a 4-byte key length, the JSON key padded to 8 bytes, the value and a
    timestamp as doubles)."""

    def __init__(self, filename: Path, capacity: int = 1 << 20) -> None:
        self._fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, capacity)
        self._capacity = capacity
        self._map = mmap.mmap(self._fd, capacity)
        self._used = 8
        struct.pack_into("i", self._map, 0, self._used)
        self.values = memoryview(self._map).cast("d")

    def slot(self, key: str) -> int:
        """A new value (0) for ``key``; its index in :attr:`values`."""
        encoded = key.encode()
        padded = encoded + b" " * (8 - (len(encoded) + 4) % 8)
        entry = struct.pack(f"i{len(padded)}sdd", len(encoded), padded, 0.0, 0.0)
        if self._used + len(entry) > self._capacity:
            self._grow(max(self._capacity * 2, self._used + len(entry)))
        self._map[self._used : self._used + len(entry)] = entry
        self._used += len(entry)
        struct.pack_into("i", self._map, 0, self._used)  # after the entry: readers see it whole
        return (self._used - 16) // 8

    def _grow(self, capacity: int) -> None:
        os.ftruncate(self._fd, capacity)
        self._capacity = capacity
        # the old mapping stays valid for views still held; both share the file's pages
        self._map = mmap.mmap(self._fd, capacity)
        self.values = memoryview(self._map).cast("d")


def _key(metric: str, name: str, labels: Mapping[str, str], help_text: str) -> str:
    # as prometheus_client.mmap_dict.mmap_key writes it
    return json.dumps([metric, name, dict(labels), help_text], sort_keys=True)


_UNSEEN: Any = object()


class _Series:
    __slots__ = ("buckets", "count", "sum")

    def __init__(self, count: int, buckets: list[int], total: int) -> None:
        self.count = count
        self.buckets = buckets
        self.sum = total


class RequestMetrics:
    """A worker's responses: counts, durations and bytes, written where they are read."""

    def __init__(self, path: Path, exempt: AbstractSet[str] = frozenset(), pid: int | None = None):
        pid = os.getpid() if pid is None else pid
        self._counters = HotFile(path / f"counter_hot{pid}.db")
        self._histograms = HotFile(path / f"histogram_hot{pid}.db")
        from aiohttp.web_urldispatcher import SystemRoute

        self._system_route = SystemRoute
        #: paths whose responses are not counted (the health probes, /metrics)
        self._exempt = exempt
        #: a canary's counts, kept with the same responses (None: not kept)
        self.stats: RequestStats | None = None
        #: by route (one of a single method) and status: the series to count in, or None
        #: (not counted)
        self._by_route: dict[Any, dict[int, _Series | None]] = {}
        self._series: dict[tuple[str, str, int], _Series] = {}
        self._hist: dict[tuple[str, str], tuple[list[int], int]] = {}
        self._bounds = DURATION_BUCKETS[:-1]
        self._bytes_in = self._counters.slot(_key(BYTES_IN, BYTES_IN + "_total", {}, BYTES_IN_HELP))
        self._bytes_out = self._counters.slot(
            _key(BYTES_OUT, BYTES_OUT + "_total", {}, BYTES_OUT_HELP)
        )
        #: the files' values, as :meth:`observe` writes them (renewed by :meth:`_new`,
        #: whose new slots may grow the files)
        self._counts = self._counters.values
        self._durations = self._histograms.values

    def known_routes(self, app: web.Application) -> None:
        """Series at 0 for each route's methods (HEAD and exempt paths left out), so
        that ``increase()`` counts from the first request on (a series that appears at 1
        loses its first increase)."""
        for route in app.router.routes():
            resource = route.resource
            if resource is None or route.method not in METHODS or route.method == "HEAD":
                continue
            if resource.canonical not in self._exempt:
                self._new(route.method, resource.canonical, 2)

    def _new(self, method: str, route: str, cls: int) -> _Series:
        series = self._series.get((method, route, cls))
        if series is not None:
            return series
        labels = {"method": method, "route": route}
        hist = self._hist.get((method, route))
        if hist is None:
            slot = self._histograms.slot
            buckets = [
                slot(_key(DURATION, DURATION + "_bucket", labels | {"le": _le(b)}, DURATION_HELP))
                for b in DURATION_BUCKETS
            ]
            total = slot(_key(DURATION, DURATION + "_sum", labels, DURATION_HELP))
            hist = self._hist[(method, route)] = (buckets, total)
        count = self._counters.slot(
            _key(REQUESTS, REQUESTS + "_total", labels | {"code": f"{cls}xx"}, REQUESTS_HELP)
        )
        series = self._series[(method, route, cls)] = _Series(count, hist[0], hist[1])
        self._counts = self._counters.values
        self._durations = self._histograms.values
        return series

    def _series_for(self, resource: Any, method: str, status: int) -> _Series | None:
        if resource is None:
            return self._new(method, "none", status // 100)
        route = resource.canonical
        if route in self._exempt:
            return None
        return self._new(method, route, status // 100)

    def observe(self, request: web.BaseRequest, status: int, seconds: float) -> None:
        """One response (the tracker calls it as the response is prepared)."""
        # match_info.route without its two property calls (a per-request cost)
        route = request._match_info._route  # type: ignore[attr-defined]
        statuses = self._by_route.get(route)
        series = _UNSEEN if statuses is None else statuses.get(status, _UNSEEN)
        if series is _UNSEEN:
            series = self._first(request, route, status)
        if series is None:
            return
        self._counts[series.count] += 1
        hist = self._durations
        hist[series.buckets[bisect.bisect_left(self._bounds, seconds)]] += 1
        hist[series.sum] += seconds
        if (stats := self.stats) is not None:
            stats.record(status, seconds)

    def _first(self, request: web.BaseRequest, route: Any, status: int) -> _Series | None:
        """The series of a response not seen before by its route and status (remembered
        for a route of one method: a request only matches it with that method)."""
        method = request.method
        if method not in METHODS:
            method = "other"  # a client's made-up methods must not make new series
        series = self._series_for(route.resource, method, status)
        if not isinstance(route, self._system_route) and route.method == method:
            # a 404 or 405 has a route object of its own, and a route of any method
            # ("*") counts each method apart: neither is remembered here
            self._by_route.setdefault(route, {})[status] = series
        return series

    def set_bytes(self, body_in: int, out: int) -> None:
        """This process's request body bytes and response bytes so far (sampled)."""
        values = self._counters.values
        values[self._bytes_in] = body_in
        values[self._bytes_out] = out


def _le(bound: float) -> str:
    # the collector reads it with float() and writes it as Prometheus does
    return "+Inf" if bound == float("inf") else repr(bound)


# -- the rest: prometheus-client's own objects ------------------------------------------


class ServiceMetrics:
    """What changes seldom, in any process (prometheus-client objects, multiprocess mode)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        from . import __version__

        reg = None  # the multiprocess collector reads the files, not a registry
        self.build_info = Gauge(
            "sdserve_build_info",
            "sdserve's version (always 1)",
            ["version"],
            multiprocess_mode="livemax",
            registry=reg,
        )
        self.build_info.labels(__version__).set(1)
        self.inflight = Gauge(
            "sdserve_requests_in_flight",
            "requests being handled (sampled)",
            multiprocess_mode="livesum",
            registry=reg,
        )
        self.connections = Gauge(
            "sdserve_connections_open",
            "client connections open (sampled)",
            multiprocess_mode="livesum",
            registry=reg,
        )
        self.rejected = Counter(
            "sdserve_requests_rejected",
            "requests refused by overload or by a limit, by reason",
            ["reason"],
            registry=reg,
        )
        self.reclaimed = Counter(
            "sdserve_connections_reclaimed",
            "idle keep-alive connections closed at max_connections to let waiting clients in",
            registry=reg,
        )
        self.log_dropped = Counter(
            "sdserve_log_lines_dropped",
            "log records dropped because the writer could not keep up",
            registry=reg,
        )
        self.drains = Counter("sdserve_drains", "drains of a process that served", registry=reg)
        self.drain_duration = Histogram(
            "sdserve_drain_duration_seconds",
            "how long a drain took",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, float("inf")),
            registry=reg,
        )
        self.drain_pending = Counter(
            "sdserve_drain_requests_pending",
            "requests in flight when a drain began",
            registry=reg,
        )
        self.drain_cancelled = Counter(
            "sdserve_drain_requests_cancelled",
            "requests cancelled at the shutdown deadline",
            registry=reg,
        )
        self.check_up = Gauge(
            "sdserve_check_up",
            "1 if the check's latest run passed (the worst over the workers)",
            ["check"],
            multiprocess_mode="livemin",
            registry=reg,
        )
        self.check_duration = Gauge(
            "sdserve_check_duration_seconds",
            "the check's latest run time (the longest over the workers)",
            ["check"],
            multiprocess_mode="livemax",
            registry=reg,
        )
        self.ready = Gauge(
            "sdserve_ready",
            "1 when the service is ready to serve",
            multiprocess_mode="livemax",
            registry=reg,
        )
        self._said: Tally[str] = Tally()
        self._dropped = 0

    def sample(
        self,
        inflight: int,
        connections: int,
        rejected: Mapping[str, int],
        dropped: int,
        checks: Mapping[str, tuple[bool, float]],
    ) -> None:
        """A worker's gauges, and its counts kept elsewhere, as they are now."""
        self.inflight.set(inflight)
        self.connections.set(connections)
        for reason, count in rejected.items():
            if (more := count - self._said[reason]) > 0:
                self.rejected.labels(reason).inc(more)
                self._said[reason] = count
        if dropped > self._dropped:
            self.log_dropped.inc(dropped - self._dropped)
            self._dropped = dropped
        for name, (ok, seconds) in checks.items():
            self.check_up.labels(name).set(1 if ok else 0)
            self.check_duration.labels(name).set(seconds)

    def drained(self, seconds: float, pending: int, cancelled: int) -> None:
        self.drains.inc()
        self.drain_duration.observe(seconds)
        self.drain_pending.inc(pending)
        self.drain_cancelled.inc(cancelled)


class SupervisorMetrics:
    """The supervisor's view: reloads, workers, restarts, readiness."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.reloads = Counter(
            "sdserve_reloads", "reloads, by result (ok, failed)", ["result"], registry=None
        )
        for result in ("ok", "failed"):
            self.reloads.labels(result)
        self.reload_duration = Histogram(
            "sdserve_reload_duration_seconds",
            "how long a reload took, from the request to the switch",
            buckets=(0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, float("inf")),
            registry=None,
        )
        self.workers = Gauge(
            "sdserve_workers",
            "worker processes ready to serve",
            multiprocess_mode="livemax",
            registry=None,
        )
        self.restarts = Counter(
            "sdserve_worker_restarts",
            "workers replaced, by cause (crash, watchdog, recycle, start)",
            ["cause"],
            registry=None,
        )
        for cause in ("crash", "watchdog", "recycle"):
            self.restarts.labels(cause)

    def logged(self, fields: Mapping[str, Any]) -> None:
        """Count what a lifecycle log record says happened."""
        phase = fields.get("SDSERVE_PHASE")
        if phase == "reloaded":
            self.reloads.labels("ok").inc()
            if (ms := fields.get("SDSERVE_DURATION_MS")) is not None:
                self.reload_duration.observe(float(ms) / 1000)
        elif phase == "reload-failed":
            self.reloads.labels("failed").inc()
        elif phase == "recycle":
            self.restarts.labels("recycle").inc()
        elif phase == "worker-died":
            cause = str(fields.get("SDSERVE_CAUSE", "crash"))
            self.restarts.labels(cause if cause in ("crash", "watchdog") else "start").inc()


async def sample_forever(
    service: ServiceMetrics, read: Callable[[], tuple[Any, ...]], period: float = SAMPLE_PERIOD
) -> None:
    """Sample a worker's gauges every ``period`` (its own task)."""
    while True:
        service.sample(*read())
        await asyncio.sleep(period)  # the sampling period itself


def handler(path: Path) -> Callable[[web.Request], Any]:
    """The ``/metrics`` endpoint."""

    async def metrics(request: web.Request) -> web.Response:
        from aiohttp import web
        from prometheus_client import CONTENT_TYPE_LATEST

        body = await asyncio.to_thread(render, path)
        response = web.Response(body=body)
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    return metrics
