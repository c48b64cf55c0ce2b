"""Connection tracking and the graceful drain.

Why this exists: a server that closes idle keep-alive connections the moment it
starts draining races every client that is about to reuse one, and those clients
see a reset or an empty reply. sdserve drains like this instead:

1. every response prepared after the drain starts carries ``Connection: close``;
2. during the drain the keep-alive timeout shrinks to ``idle_grace``: a
   connection may stay idle that long, counted from its last request, to
   deliver one more, which is answered with ``Connection: close``. One that has
   already been idle longer is closed as the drain starts, while clients are
   still in their steady state and not reaching for it (during a restart a
   client short of connections works through its idle ones, so closing them
   later races it);
3. a request that has been read is always answered;
4. a connection is closed only when it is idle, with no byte received for its
   grace and none waiting in the kernel;
5. WebSockets are closed with 1001 (going away);
6. at the deadline the handlers still running are cancelled and reported.

Idle detection uses one piece of aiohttp's protocol state (the future its
request loop parks on between requests), the same signal aiohttp's own
keep-alive timer uses; :func:`is_parked` is the only place that reads it.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import logging
import socket
import termios
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSCloseCode, web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("sdserve.drain")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_parked(proto: RequestHandler) -> bool:
    """True when the connection's request loop waits for the next request, none queued."""
    waiter: asyncio.Future[None] | None = getattr(proto, "_waiter", None)
    return waiter is not None and not waiter.done()


def unread_bytes(proto: RequestHandler) -> int:
    """Bytes the kernel holds for this connection that the event loop has not read yet."""
    transport = proto.transport
    if transport is None:
        return 0
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    except OSError:
        return 0
    return buf[0]


@dataclass
class InFlight:
    request: web.BaseRequest
    started: float


@dataclass
class DrainReport:
    duration: float
    requests_completed: int
    cancelled: list[str] = field(default_factory=list)
    idle_closed: int = 0
    websockets_closed: int = 0

    @property
    def clean(self) -> bool:
        return not self.cancelled


class Tracker:
    """Tracks connections, in-flight requests and WebSockets of one worker, and drains them."""

    def __init__(self, idle_grace: float, max_concurrency: int = 0) -> None:
        self.idle_grace = idle_grace
        self.max_concurrency = max_concurrency
        self.connections: set[TrackedRequestHandler] = set()
        #: in-flight requests by id(request) (requests are mutable mappings, not hashable)
        self.inflight: dict[int, InFlight] = {}
        self.websockets: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()
        self.pending_accepts = 0
        self.draining = False
        self.requests_total = 0
        self.completed_in_drain = 0
        self.idle_closed = 0
        #: paths that are never shed under overload (health probes)
        self.exempt_paths: set[str] = set()
        #: after this many requests (0: never), call on_limit once
        self.request_limit = 0
        self.on_limit: Callable[[], object] | None = None
        self._changed = asyncio.Event()
        self._timers: dict[TrackedRequestHandler, asyncio.TimerHandle] = {}
        self._ws_tasks: set[asyncio.Task[bool]] = set()
        self.websockets_closed = 0

    # -- hooks -------------------------------------------------------------------------

    def changed(self) -> None:
        self._changed.set()

    def install(self, app: web.Application) -> None:
        """Add the tracking middleware (outermost) and the response hook to ``app``."""
        app.middlewares.insert(0, self._middleware)
        app.on_response_prepare.append(self._on_response_prepare)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if (
            self.max_concurrency
            and len(self.inflight) >= self.max_concurrency
            and request.path not in self.exempt_paths
        ):
            raise web.HTTPServiceUnavailable(
                headers={"Retry-After": "1"}, text="overloaded, retry shortly\n"
            )
        self.requests_total += 1
        if self.requests_total == self.request_limit and self.on_limit is not None:
            self.on_limit()
        self.inflight[id(request)] = InFlight(request, time.monotonic())
        proto = request.protocol
        if isinstance(proto, TrackedRequestHandler):
            self._cancel_timer(proto)
        try:
            return await handler(request)
        finally:
            del self.inflight[id(request)]
            if self.draining:
                self.completed_in_drain += 1
                if isinstance(proto, TrackedRequestHandler):
                    # A response prepared before the drain keeps the connection alive:
                    # that connection gets its own grace once it turns idle.
                    self._arm(proto)
            self._changed.set()

    async def _on_response_prepare(
        self, request: web.BaseRequest, response: web.StreamResponse
    ) -> None:
        if isinstance(response, web.WebSocketResponse):
            self.websockets.add(response)
            if self.draining:
                asyncio.get_running_loop().call_soon(self._close_websocket, response)
        elif self.draining:
            # aiohttp computes the Connection header before this hook runs: set both
            # the header the client sees and the flag that closes after the response.
            response.force_close()
            response.headers["Connection"] = "close"

    # -- drain -------------------------------------------------------------------------

    def _cancel_timer(self, proto: TrackedRequestHandler) -> None:
        timer = self._timers.pop(proto, None)
        if timer is not None:
            timer.cancel()

    def _arm(self, proto: TrackedRequestHandler, since: float | None = None) -> None:
        """Close ``proto`` once idle for idle_grace, counted from ``since`` (default: now)."""
        if proto not in self.connections:
            return
        self._cancel_timer(proto)
        loop = asyncio.get_running_loop()
        start = loop.time() if since is None else since
        when = start + self.idle_grace
        if when <= loop.time():
            self._expire(proto, start)
        else:
            self._timers[proto] = loop.call_at(when, self._expire, proto, start)

    def _expire(self, proto: TrackedRequestHandler, idle_since: float) -> None:
        self._timers.pop(proto, None)
        if proto not in self.connections:
            return
        if not is_parked(proto):
            # Still writing a response, or a request is being handled: it closes
            # itself after a Connection: close response, or re-arms at request end.
            if not any(f.request.protocol is proto for f in self.inflight.values()):
                self._arm(proto)  # finishing a response prepared before the drain
            return
        if proto.last_rx > idle_since or unread_bytes(proto) > 0:
            return  # a request is arriving; it is answered with Connection: close
        self.idle_closed += 1
        proto.force_close()

    def _close_websocket(self, ws: web.WebSocketResponse) -> None:
        if ws.closed:
            return
        task = asyncio.get_running_loop().create_task(
            ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
        )
        self.websockets_closed += 1
        self._ws_tasks.add(task)
        task.add_done_callback(self._ws_tasks.discard)

    def begin_drain(self) -> None:
        """From now on: Connection: close, idle grace, WebSockets closed with 1001."""
        if self.draining:
            return
        self.draining = True
        for ws in list(self.websockets):
            self._close_websocket(ws)
        for proto in list(self.connections):
            if is_parked(proto):
                self._arm(proto, since=proto.last_rx)
        self._changed.set()

    @property
    def busy(self) -> bool:
        return bool(self.connections or self.inflight or self.pending_accepts)

    async def wait_drained(self, deadline: float) -> bool:
        """Wait until no connection, request or accept is left; False at the deadline."""
        loop = asyncio.get_running_loop()
        while self.busy:
            self._changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return not self.busy
        return True

    async def finish(self, deadline: float) -> DrainReport:
        """Drain until ``deadline`` (loop time); cancel and report what is left then."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.begin_drain()
        drained = await self.wait_drained(deadline)
        cancelled: list[str] = []
        if not drained:
            now = time.monotonic()
            for item in list(self.inflight.values()):
                req = item.request
                desc = f"{req.method} {req.path_qs} (running {now - item.started:.1f}s)"
                cancelled.append(desc)
                log.warning(
                    "cancelling request past the shutdown deadline: %s",
                    desc,
                    extra={"SDSERVE_PHASE": "drain", "SDSERVE_REQUEST": f"{req.method} {req.path}"},
                )
                req.task.cancel()
            for proto in list(self.connections):
                proto.force_close()
            # the cancelled handlers unwind; give them until the cancellation settles
            await self.wait_drained(loop.time() + 1.0)
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        return DrainReport(
            duration=loop.time() - started,
            requests_completed=self.completed_in_drain,
            cancelled=cancelled,
            idle_closed=self.idle_closed,
            websockets_closed=self.websockets_closed,
        )


class TrackedRequestHandler(RequestHandler):
    """aiohttp's protocol, reporting connections and received bytes to a :class:`Tracker`."""

    __slots__ = ("last_rx", "tracker")

    def __init__(self, tracker: Tracker, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.tracker = tracker
        self.last_rx = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.last_rx = asyncio.get_running_loop().time()  # idle since it connected
        self.tracker.connections.add(self)
        if self.tracker.draining:
            # accepted just before the drain began: serve its request, then close
            self.tracker._arm(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self.tracker.connections.discard(self)
        self.tracker._cancel_timer(self)
        self.tracker.changed()

    def data_received(self, data: bytes) -> None:
        if data:
            self.last_rx = asyncio.get_running_loop().time()
        super().data_received(data)


def set_nodelay(sock: socket.socket) -> None:
    """TCP_NODELAY on an accepted TCP connection (a no-op for unix sockets)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
