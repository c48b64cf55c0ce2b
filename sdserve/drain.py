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

Every connection is bounded, whatever its client does:

7. a connection that sends bytes but no complete request line and headers within
   ``header_timeout`` (counted from its first byte) gets 408 and is closed
   (slowloris); in a drain the bound is ``idle_grace`` from the drain's start (or the
   first byte, if later), when that comes first;
8. a response still being written when the drain starts (a large body, a file)
   finishes, bounded by ``shutdown_timeout``, and its connection closes after it;
9. pipelined requests already read are all answered: only the last of them carries
   ``Connection: close``.

A drain may **hand connections over** instead (:mod:`sdserve.handover`): then an
idle connection that is :func:`movable` is given to the next process at once, not
closed after its grace; a response during the drain keeps the connection alive, and
once written its connection is handed over too. Only for ``idle_grace`` from the
drain's start, so that a client that never pauses cannot hold the drain; after it,
and for a connection that cannot move, the drain goes on as above.

The application sees the drain begin: :func:`draining` is an event set at that
moment (a server-sent-events or long-poll handler waits on it to say goodbye and
end), the hooks of :func:`add_drain_hook` run then, and so do the app's
``on_shutdown`` hooks, as in aiohttp's own order; handlers are then awaited up to
the deadline, and ``on_cleanup`` runs after the last request.

Limits are answered with their status and counted in :attr:`Tracker.rejected`: 408
(header timeout), 413 (a declared body over ``max_body_size``), 414 (request line
over ``max_request_line``), 431 (a header field over ``max_header_size``, or more
than ``max_headers``), 503 with ``Retry-After`` (overload, by
:mod:`sdserve.admission`: the adaptive limit, the queue's deadline, a client's rate, or
``max_concurrency`` when admission control is off; and ``request_timeout`` when the
response had not started).

Three pieces of aiohttp's protocol state are read, each in one function: the future
its request loop parks on between requests (:func:`is_parked`, the same signal
aiohttp's own keep-alive timer uses), its queue of requests already read
(:func:`queued_requests`) and its flag for a request being handled or its response
written (:func:`in_progress`).
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import functools
import logging
import socket
import termios
import time
import warnings
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from aiohttp import WSCloseCode, hdrs, web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, EmptyStreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from .accesslog import AccessLog
from .admission import NORMAL, Admission, Priority

log = logging.getLogger("sdserve.drain")

RequestHandlerFunc = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
RequestFactory = Callable[..., web.BaseRequest]
#: (request, status, monotonic start, the response if the handler returned one)
#: (request, status, seconds since its handler began) of a response, as it is prepared
ResponseHook = Callable[[web.BaseRequest, int, float], None]


def is_parked(proto: RequestHandler) -> bool:
    """True when the connection's request loop waits for the next request, none queued."""
    waiter: asyncio.Future[None] | None = getattr(proto, "_waiter", None)
    return waiter is not None and not waiter.done()


def in_progress(proto: RequestHandler) -> bool:
    """A request of this connection is being handled or its response written."""
    return bool(getattr(proto, "_request_in_progress", False))


def queued_requests(proto: RequestHandler) -> int:
    """Requests read from the connection (pipelined) whose handler has not started yet."""
    return len(getattr(proto, "_messages", ()))


def movable(proto: TrackedRequestHandler) -> bool:
    """The connection can go to another process now: nothing of it is in this one.

    It is parked between requests with none queued, its response is written out (no
    byte waits in the transport), no byte of a next request has been read (the last
    bytes read ended a request: :attr:`TrackedRequestHandler.at_boundary`), it is not
    TLS, and it belongs to the application, not the admin socket. Bytes the kernel
    holds unread are no obstacle: they move with the fd.
    """
    transport = proto.transport
    return (
        proto.main
        and transport is not None
        and not transport.is_closing()
        and proto.at_boundary
        and is_parked(proto)
        and not in_progress(proto)
        and queued_requests(proto) == 0
        and not proto.request_arriving
        and transport.get_write_buffer_size() == 0
        and transport.get_extra_info("sslcontext") is None
        and transport.get_extra_info("socket") is not None
    )


def _event_stream(response: web.StreamResponse) -> bool:
    """A stream of server-sent events (``text/event-stream``)."""
    kind = response._headers.get(hdrs.CONTENT_TYPE)
    return kind is not None and kind.lower().startswith("text/event-stream")


def idle_since(proto: TrackedRequestHandler) -> float | None:
    """When the connection went idle between requests (loop time: its last response
    written, or bytes last read, whichever is later), or None when it is not idle: a
    request is arriving, queued, handled or answered, it is upgraded (a WebSocket), it
    is closing, or keep-alive is off (then it is closed after each response anyway)."""
    transport = proto.transport
    keepalive = proto._keepalive_timeout
    if (
        not keepalive
        or transport is None
        or transport.is_closing()
        or proto._force_close
        or proto._close
        or proto._upgraded
        or not is_parked(proto)
        or in_progress(proto)
        or queued_requests(proto)
        or proto.request_arriving
    ):
        return None
    # aiohttp sets the keep-alive deadline as the connection is made and after each
    # response: that moment is when it last went idle
    return max(proto.last_rx, proto._next_keepalive_close_time - keepalive)


# -- what the application sees of the drain ---------------------------------------------

DrainHook = Callable[[web.Application], Awaitable[None]]
#: this worker's admission controller, for the application to read (its limit, counts)
ADMISSION = web.AppKey("sdserve.admission", Admission)
DRAINING = web.AppKey("sdserve.draining", asyncio.Event)
DRAIN_HOOKS = web.AppKey("sdserve.drain_hooks", list[DrainHook])


def draining(target: web.Application | web.Request) -> asyncio.Event:
    """The event set when this worker's drain begins (a stop, or a reload replacing it).

    Pass the application (in its factory or hooks) or a request (in a handler, also of a
    sub-application). A handler of a stream that never ends by itself (server-sent events,
    a long poll) waits on it, says goodbye and returns, so the drain need not wait for it.
    """
    if isinstance(target, web.Request):
        found = target.config_dict.get(DRAINING)
        return found if found is not None else asyncio.Event()  # not run by sdserve
    event = target.get(DRAINING)
    if event is None:
        event = asyncio.Event()
        target[DRAINING] = event
    return event


def add_drain_hook(app: web.Application, hook: DrainHook) -> None:
    """Run ``await hook(app)`` when the drain begins, before the app's ``on_shutdown``."""
    hooks = app.get(DRAIN_HOOKS)
    if hooks is None:
        hooks = []
        app[DRAIN_HOOKS] = hooks
    hooks.append(hook)


def prepare_app(app: web.Application) -> None:
    """Before the app is frozen: make sure its drain event exists."""
    draining(app)


async def announce_drain(app: web.Application, deadline: float) -> None:
    """The drain begins: set the event, run the drain hooks, then ``on_shutdown``, all within
    ``deadline`` (loop time). A hook that raises is logged and the next one runs."""
    draining(app).set()
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout_at(deadline):
            for hook in list(app.get(DRAIN_HOOKS) or ()):
                try:
                    await hook(app)
                except Exception as exc:
                    log.error(
                        "drain hook %s failed: %r",
                        getattr(hook, "__qualname__", hook),
                        exc,
                        exc_info=exc,
                        extra={"SDSERVE_PHASE": "drain"},
                    )
            await app.shutdown()  # on_shutdown, as aiohttp runs it
    except TimeoutError:
        log.error(
            "the drain and on_shutdown hooks did not finish before the shutdown deadline "
            "(%.1fs late)",
            loop.time() - deadline,
            extra={"SDSERVE_PHASE": "drain"},
        )


@dataclass(frozen=True)
class Limits:
    """What bounds one connection and one request (see :class:`sdserve.config.Config`)."""

    header_timeout: float = 10.0
    max_body_size: int = 0
    request_timeout: float = 0.0
    max_request_line: int = 4094
    max_header_size: int = 8190


_TIMEOUT_BODY = b"the request did not arrive in time\n"
_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: text/plain\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)
)


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
class DrainReport:
    duration: float
    requests_completed: int
    cancelled: list[str] = field(default_factory=list)
    idle_closed: int = 0
    websockets_closed: int = 0
    #: connections handed over to the next process instead of closed
    handed_over: int = 0

    @property
    def clean(self) -> bool:
        return not self.cancelled


class Tracker:
    """Tracks connections, in-flight requests and WebSockets of one worker, and drains them."""

    def __init__(
        self, idle_grace: float, max_concurrency: int = 0, limits: Limits | None = None
    ) -> None:
        self.idle_grace = idle_grace
        self.max_concurrency = max_concurrency
        self.limits = limits or Limits()
        #: requests and connections refused by a limit, by reason
        self.rejected: Counter[str] = Counter()
        #: called when a connection closes (an acceptor paused at its limit resumes)
        self.on_closed: list[Callable[[], None]] = []
        self.connections: set[TrackedRequestHandler] = set()
        #: in-flight requests (handled, or their response being written) by connection:
        #: a connection handles one request at a time
        self.inflight: dict[TrackedRequestHandler, web.BaseRequest] = {}
        self.websockets: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()
        #: response classes seen, and whether each is a WebSocket's
        self._websocket_kinds: dict[type[web.StreamResponse], bool] = {}
        self.pending_accepts = 0
        #: requests whose response is a stream of server-sent events under way: not
        #: counted by the caps (see :meth:`prepared`)
        self.streams = 0
        self.draining = False
        self.requests_total = 0
        #: a static cap, admission control or request_timeout: a request may be held
        #: back (set by :meth:`install`, once they are)
        self.gated = False
        #: called with (request, status, seconds since its handler began) as the
        #: response of a tracked request is prepared: the metrics and a canary's counts
        #: (:mod:`sdserve.metrics`, :mod:`sdserve.canary`); None: nothing counts them
        self.on_response: ResponseHook | None = None
        #: trace ids and the access log of the application's socket(s) (None: off)
        self.access: AccessLog | None = None
        #: bytes of the requests answered on the application's sockets: their bodies (by
        #: Content-Length), and their responses as written (headers included)
        self.body_bytes_in = 0
        self.response_bytes = 0
        self.completed_in_drain = 0
        self.idle_closed = 0
        #: idle keep-alive connections closed at max_connections to let new clients in,
        #: and who hears of each such closing at once (the metrics; None: nobody)
        self.reclaimed = 0
        self.on_reclaimed: Callable[[int], object] | None = None
        #: adaptive limit, wait queue, priorities (None: only max_concurrency, a static cap)
        self.admission: Admission | None = None
        #: paths that are never shed under overload (health probes)
        self.exempt_paths: set[str] = set()
        #: after this many requests (0: never), call on_limit once
        self.request_limit = 0
        self.on_limit: Callable[[], object] | None = None
        self._changed = asyncio.Event()
        self._timers: dict[TrackedRequestHandler, asyncio.TimerHandle] = {}
        self._ws_tasks: set[asyncio.Task[bool]] = set()
        self.websockets_closed = 0
        #: during a drain that hands connections over: takes the connections it can
        #: (their sockets are duplicated and sent), returns those taken
        self.handover: Callable[[list[TrackedRequestHandler]], list[TrackedRequestHandler]] | None
        self.handover = None
        #: until this loop time, responses keep their connection alive to hand it over
        self.handover_until = 0.0
        self.handed_over = 0
        self._to_hand: list[TrackedRequestHandler] = []
        self._hand_scheduled = False

    # -- hooks -------------------------------------------------------------------------

    def changed(self) -> None:
        self._changed.set()

    def install(self, app: web.Application) -> RequestFactory | None:
        """Track ``app``'s requests: by the protocol (:class:`TrackedRequestHandler`), not by
        a middleware, so nothing is added between aiohttp and the application's handler.

        Returns the request factory its connections use: aiohttp's own, making a
        :class:`TrackedRequest`, whose response hook replaces aiohttp's (no signal, no
        coroutine more per response). An application class with a request factory of its
        own keeps it, and gets the hook as an ``on_response_prepare`` signal (None)."""
        if self.admission is not None:
            app[ADMISSION] = self.admission
        self.gated = bool(
            self.max_concurrency or self.admission is not None or self.limits.request_timeout
        )
        if type(app)._make_request is web.Application._make_request:
            # a partial (C), not a closure: no Python frame more per request
            return functools.partial(app._make_request, _cls=TrackedRequest)
        app.on_response_prepare.append(self._on_response_prepare)
        return None

    def refusal(self, request: web.BaseRequest) -> web.StreamResponse | web.HTTPException | None:
        """The limit ``request`` is over (counted), or None: it is admitted (by the
        static cap; admission control, when on, comes next: :meth:`admit`). Only called
        for a request that may be over one: with a static cap, or with a body."""
        if (
            self.admission is None
            and self.max_concurrency
            # a WebSocket or an event stream lives as long as its client: neither held
            # nor counted, as with admission control (else a few would hold it for good)
            and len(self.inflight) - len(self.websockets) - self.streams >= self.max_concurrency
            and not request._message.upgrade
            and request.path not in self.exempt_paths
        ):
            self.rejected["limit"] += 1
            return _shed("limit")
        most = self.limits.max_body_size
        if most and request.body_exists:
            length = request.content_length
            if length is not None and length > most:
                self.rejected["body_too_large"] += 1
                return web.HTTPRequestEntityTooLarge(max_size=most, actual_size=length)
        return None

    def admit(
        self, proto: TrackedRequestHandler, request: web.BaseRequest, admission: Admission
    ) -> str | asyncio.Future[str | None] | None:
        """Admission control for ``request``: None: admitted; a reason: shed; a future:
        queued (:meth:`queued`). A plain call, not a coroutine: the usual answer is
        None, at once."""
        arrived = proto.last_rx  # set as the connection was made, and at each read
        if admission.classifies:
            header = admission.settings.priority_header
            mark = request.headers.get(header) if header else None
            priority = admission.priority_of(request.path, mark)
        else:
            priority = Priority.NORMAL
        client = request.remote if admission.settings.client_rate else None
        return admission.admit(arrived, priority, client, proto.rx_cpu)

    def engage(self) -> None:
        """Pressure: admission control's bookkeeping engages, counting the application's
        requests in flight from now on (each is then released at its end)."""
        admission = self.admission
        assert admission is not None
        adopted = 0
        for proto, request in self.inflight.items():
            if not proto.main or proto.streaming:
                continue  # not the application's, or an event stream: not counted
            if proto.admitted_at is not None and not proto.timed:
                continue  # counted already
            if request._message.upgrade or _path(request) in self.exempt_paths:
                continue  # a WebSocket is not held by admission control (_handle_request)
            if proto.admitted_at is None:
                proto.admitted_at = proto.request_began  # the admission clock: monotonic
            proto.timed = False
            adopted += 1
        admission.engage(adopted)

    @staticmethod
    async def queued(admission: Admission, waiting: asyncio.Future[str | None]) -> str | None:
        """A queued request's wait: None once admitted, or the reason it is refused at
        its deadline."""
        try:
            return await waiting
        except asyncio.CancelledError:
            admission.abandon(waiting)
            raise

    def ended(self, proto: TrackedRequestHandler) -> None:
        """A request of ``proto`` that ended during a drain is answered (its response
        written) or cancelled (its admission, if any, released already)."""
        if self.draining:
            self.completed_in_drain += 1
            # A response prepared before the drain kept the connection alive: that
            # connection gets its own grace now that it turns idle.
            self._arm(proto)
            if self.handover is not None and (task := asyncio.current_task()):
                # once the connection is parked: this task's callbacks run after the
                # connection's own loop resumed
                task.add_done_callback(functools.partial(self._offered, proto))
            self._changed.set()  # only a drain waits for it

    async def bounded(
        self, handler: RequestHandlerFunc, request: web.BaseRequest
    ) -> web.StreamResponse:
        """The handler within ``request_timeout``; 503 if it ran out before responding."""
        scope = asyncio.timeout(self.limits.request_timeout)
        try:
            async with scope:
                return await handler(request)
        except TimeoutError:
            if not scope.expired():
                raise  # the handler's own timeout
            self.rejected["request_timeout"] += 1
            log.warning(
                "request past request_timeout (%.1fs), cancelled: %s %s",
                self.limits.request_timeout,
                request.method,
                request.path,
                extra={"SDSERVE_PHASE": "limit", "SDSERVE_LIMIT": "request_timeout"},
            )
            if request.writer.output_size > 0:
                raise  # the response had begun: the connection breaks off
            raise web.HTTPServiceUnavailable(
                headers={"Retry-After": "1"}, text="the request took too long\n"
            ) from None

    async def _on_response_prepare(
        self, request: web.BaseRequest, response: web.StreamResponse
    ) -> None:
        self.prepared(request.protocol, request, response)  # type: ignore[arg-type]

    def prepared(
        self,
        proto: TrackedRequestHandler,
        request: web.BaseRequest,
        response: web.StreamResponse,
    ) -> None:
        """``response``'s headers go out (aiohttp's prepare)."""
        # as TrackedRequest._prepare_hook does for the usual response, inline
        if (access := proto.access) is not None and proto.request_began:
            access.prepared(proto, response)
        hook = self.on_response
        if hook is not None and (began := proto.request_began):
            # A request of the application (a refusal began no handler), counted as its
            # headers go out, so a client never has an answer that was not counted (a
            # worker killed meanwhile). response.status, without a property call:
            hook(request, response._status, time.monotonic() - began)
        kind = type(response)
        websocket = False
        if kind is not web.Response:
            # isinstance() of a response is slow: it is a MutableMapping
            known = self._websocket_kinds.get(kind)
            if known is None:
                known = self._websocket_kinds[kind] = issubclass(kind, web.WebSocketResponse)
            websocket = known
            if (
                not websocket
                and proto.request_began
                and not proto.streaming
                and _event_stream(response)
            ):
                # Server-sent events: the stream lasts as long as its client, as a
                # WebSocket does. So, as a WebSocket, it is no longer counted in flight by
                # the caps once its headers are out: admission control releases it now
                # (its latency is its time to the first event, not the stream's life,
                # which would read as a slow service), and the static cap leaves it out.
                # Other streams (a file, chunks of a report) are work that ends: counted.
                proto.streaming = True
                self.streams += 1
                if proto.admitted_at is not None:
                    proto.settle()
        if websocket:
            assert isinstance(response, web.WebSocketResponse)
            self.websockets.add(response)
            if self.draining:
                asyncio.get_running_loop().call_soon(self._close_websocket, response)
        elif self.draining and queued_requests(proto) == 0:
            if self._handing() and proto.main:
                return  # kept alive, to be handed over once written
            # aiohttp computes the Connection header before this hook runs: set both
            # the header the client sees and the flag that closes after the response.
            # Pipelined requests already read come first: only the last says close.
            response.force_close()
            response.headers["Connection"] = "close"

    # -- hand-over ---------------------------------------------------------------------

    def _handing(self) -> bool:
        return self.handover is not None and asyncio.get_running_loop().time() < self.handover_until

    def _offered(self, proto: TrackedRequestHandler, _task: asyncio.Task[Any]) -> None:
        self._offer(proto)

    def _offer(self, proto: TrackedRequestHandler) -> None:
        """Hand ``proto`` over if it can move now (soon, with others, in one message)."""
        if self.handover is None or proto not in self.connections or proto.offered or proto.refused:
            return
        if not movable(proto):
            return  # its grace timer goes on: closed when idle, as in any drain
        proto.offered = True
        self._to_hand.append(proto)
        if not self._hand_scheduled:
            self._hand_scheduled = True
            asyncio.get_running_loop().call_soon(self._hand)

    def _hand(self) -> None:
        self._hand_scheduled = False
        batch, self._to_hand = self._to_hand, []
        # still movable now? (a byte may have come since it was offered)
        ready = [p for p in batch if p in self.connections and movable(p)]
        for proto in batch:
            proto.offered = False
        if not ready or self.handover is None:
            return
        taken = self.handover(ready)
        for proto in taken:
            self._cancel_timer(proto)
            # our copy closes without shutdown(): the client sees nothing
            assert proto.transport is not None
            proto.transport.abort()
        self.handed_over += len(taken)
        if len(taken) < len(ready):
            # not taken (the store is full, the link is gone): drained as any other
            kept = set(map(id, taken))
            for proto in ready:
                if id(proto) not in kept:
                    proto.refused = True
                    self._arm(proto)
        self._changed.set()

    def reclaim_idle(self, most: int, idle_for: float) -> tuple[int, float]:
        """At ``max_connections``, with clients waiting in the kernel's queue: close up to
        ``most`` of the application's keep-alive connections that have been idle between
        requests for ``idle_for`` seconds or more, the longest idle first (as nginx
        reuses its idle keep-alive connections when it runs out). A client may close an
        idle connection at any time and must be ready to reconnect; a connection with
        a byte of a request come or in the kernel is not idle and stays.

        Returns how many were closed, and when (loop time) to look again if clients
        still wait: when the next idle connection is due, else ``idle_for`` from now."""
        now = asyncio.get_running_loop().time()
        idle = [
            (since, proto)
            for proto in self.connections
            if proto.main and (since := idle_since(proto)) is not None
        ]
        idle.sort(key=itemgetter(0))
        closed = 0
        again = now + idle_for
        for since, proto in idle:
            if since > now - idle_for:
                again = since + idle_for
                break
            if closed >= most:
                break
            if unread_bytes(proto) > 0:
                continue  # a request is in the kernel: it is about to be read
            proto.force_close()
            closed += 1
        if closed:
            self.reclaimed += closed
            if self.on_reclaimed is not None:
                self.on_reclaimed(closed)
        return closed, again

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
        if self.handover is not None and not proto.refused and movable(proto):
            self._offer(proto)  # better than closing it, even after the window
            return
        if not is_parked(proto):
            # Still writing a response, or a request is being handled: it closes
            # itself after a Connection: close response, or re-arms at request end.
            if proto._current_request is None:
                self._arm(proto)  # finishing a response prepared before the drain
            return
        if proto.last_rx > idle_since or unread_bytes(proto) > 0 or proto.request_arriving:
            # a request is arriving: answered with Connection: close if it completes,
            # a 408 at its header deadline if it does not
            return
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

    def begin_drain(
        self,
        handover: Callable[[list[TrackedRequestHandler]], list[TrackedRequestHandler]]
        | None = None,
    ) -> None:
        """From now on: Connection: close, idle grace, WebSockets closed with 1001; or,
        with ``handover``, idle connections handed over (see the module docstring)."""
        if self.draining:
            return
        self.draining = True
        for ws in list(self.websockets):
            self._close_websocket(ws)
        now = asyncio.get_running_loop().time()
        if handover is not None:
            self.handover = handover
            self.handover_until = now + self.idle_grace
        for proto in list(self.connections):
            # a request still arriving gets the grace to complete (then 408), not the
            # whole header timeout: a slow or hostile client cannot hold the drain
            proto.hurry_header(now + self.idle_grace)
            if handover is not None and movable(proto):
                self._offer(proto)
            elif is_parked(proto):
                self._arm(proto, since=proto.last_rx)
            else:
                keep = handover is not None and proto.main  # handed over once written
                if in_progress(proto) and queued_requests(proto) == 0 and not keep:
                    # a response under way (perhaps prepared before the drain, with
                    # keep-alive): the connection closes once it is written. Not a
                    # connection whose request is still arriving: close() would make
                    # aiohttp drop its bytes, and it is answered with Connection: close
                    proto.close()
                self._arm(proto)
        self._changed.set()

    def stop_handing_over(self) -> None:
        """The drain goes on without hand-over, as a drain without one from the start:
        answers from now on close their connection, and each connection gets its grace
        from now (then closes once idle; a request that arrives meanwhile is answered
        first). From now: the answers just sent kept their connections alive for the
        hand-over, and their clients may be sending the next request."""
        if self.handover is None:
            return
        self.handover = None
        self.handover_until = 0.0
        for proto in self._to_hand:
            proto.offered = False
        self._to_hand.clear()
        for proto in list(self.connections):
            self._arm(proto)
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
            for proto, req in list(self.inflight.items()):
                if proto._current_request is req:  # its handler runs (perhaps for a gone client)
                    desc = f"{req.method} {req.path_qs} (running {now - proto.request_began:.1f}s)"
                    cancelled.append(desc)
                    log.warning(
                        "cancelling request past the shutdown deadline: %s",
                        desc,
                        extra={
                            "SDSERVE_PHASE": "drain",
                            "SDSERVE_REQUEST": f"{req.method} {req.path}",
                        },
                    )
                    req.task.cancel()
            for proto in list(self.connections):
                if in_progress(proto) and proto._current_request is None:
                    # its handler is done, its response is not: a reader too slow for
                    # the deadline (a large body, a file)
                    peer = proto.transport.get_extra_info("peername") if proto.transport else None
                    desc = f"a response still being written to {peer or 'a client'}"
                    cancelled.append(desc)
                    log.warning(
                        "cutting %s at the shutdown deadline",
                        desc,
                        extra={"SDSERVE_PHASE": "drain"},
                    )
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
            handed_over=self.handed_over,
        )


class TrackedRequest(web.Request):
    """aiohttp's request, whose response hook tells the tracker (:meth:`Tracker.prepared`)
    before it runs the applications' ``on_response_prepare`` signals, as aiohttp's does."""

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        proto: TrackedRequestHandler = self._protocol  # type: ignore[assignment]
        tracker = proto.tracker
        if type(response) is web.Response and not tracker.draining:
            # the usual case, without a call more (Tracker.prepared does the same, and
            # the rest): the trace headers, and the counts
            if (access := proto.access) is not None and proto.request_began:
                access.prepared(proto, response)
            hook = tracker.on_response
            if hook is not None and (began := proto.request_began):
                hook(self, response._status, time.monotonic() - began)
        else:
            tracker.prepared(proto, self, response)
        match_info = self._match_info
        if match_info is None:
            return
        for app in match_info._apps:
            if on_prepare := app.on_response_prepare:
                await on_prepare.send(self, response)


#: aiohttp's own, called without a super() object on the request path
_data_received = RequestHandler.data_received
_handle_request = RequestHandler._handle_request


class TrackedRequestHandler(RequestHandler):
    """aiohttp's protocol, reporting connections and received bytes to a :class:`Tracker`,
    with a header deadline and the limits' statuses."""

    __slots__ = (
        "_header_timer",
        "access",
        "admitted_at",
        "at_boundary",
        "client",
        "last_rx",
        "main",
        "offered",
        "refused",
        "request_began",
        "request_id",
        "rx_cpu",
        "span",
        "streaming",
        "timed",
        "trace",
        "tracker",
    )

    def __init__(
        self,
        tracker: Tracker,
        manager: web.Server,
        *,
        main: bool = True,
        request_factory: RequestFactory | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        if request_factory is not None:
            self._request_factory = request_factory  # see Tracker.install
        self.tracker = tracker
        #: a connection of the application (not of the admin socket): it may be handed over
        self.main = main
        #: trace ids and the access log (the tracker's, set before connections come), for
        #: the application's connections only
        self.access = tracker.access if main else None
        self.last_rx = 0.0
        #: the process's CPU time when bytes last came (None: no admission control)
        self.rx_cpu: float | None = None
        #: the bytes read so far end where a request ends (nothing of the next is read)
        self.at_boundary = True
        self.offered = False
        #: the hand-over did not take it: drained like any connection
        self.refused = False
        self._header_timer: asyncio.TimerHandle | None = None
        #: when the request being handled began (time.monotonic())
        self.request_began = 0.0
        #: the admission controller's clock when it let the request in (None: not counted)
        self.admitted_at: float | None = None
        #: the request was let in while admission was not engaged, and is only timed
        #: (:meth:`Admission.sample`), not counted in flight
        self.timed = False
        #: the request's response is a stream of server-sent events under way (see
        #: :meth:`Tracker.prepared`): counted in :attr:`Tracker.streams` until it ends
        self.streaming = False
        #: the request's trace id and request id (:mod:`sdserve.accesslog`), and its
        #: client behind a trusted proxy (:mod:`sdserve.proxies`; None: the peer)
        self.trace = ""
        self.span = ""
        self.request_id = ""
        self.client: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.last_rx = asyncio.get_running_loop().time()  # idle since it connected
        self.tracker.connections.add(self)
        if self.tracker.draining:
            # accepted just before the drain began: serve its request, then close
            self.tracker._arm(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._cancel_header_timer()
        self.tracker.connections.discard(self)
        self.tracker._cancel_timer(self)
        self.tracker.changed()
        for callback in self.tracker.on_closed:
            callback()

    def data_received(self, data: bytes) -> None:
        if not data:
            super().data_received(data)
            return
        self.last_rx = now = self._loop.time()
        tracker = self.tracker
        messages = self._messages
        queued = len(messages)
        admission = tracker.admission
        if admission is None or not admission.engaged:  # off, or no pressure (its doc)
            _data_received(self, data)
        else:
            self.rx_cpu = time.process_time()  # the work ahead of it, for admission
            if (
                admission.pacing  # sustained overload
                and self.main
                and not queued
                and is_parked(self)
                and not tracker.draining  # (a drain's answers close their connection)
            ):
                self._feed_shedding(data, admission, now)
            else:
                _data_received(self, data)
        # Whether these bytes end where a request ends. Without a body, a request ends
        # with its header block (and a chunked body with its empty last chunk); a
        # whole request with a Content-Length body in one read is checked by its
        # length. Anything else (a body over several reads) is taken as not at a
        # boundary: that connection is not handed over, only drained.
        if data.endswith(b"\r\n\r\n"):
            self.at_boundary = True
            return  # no request line and headers left incomplete (the usual case)
        self.at_boundary = self.at_boundary and _one_request_with_body(self, data, queued)
        if self._header_timer is not None or len(messages) > queued or self._request_in_progress:
            return  # a deadline runs already, or nothing is left incomplete
        # bytes of a request whose line and headers are not all here: they must follow in
        # time (from these first bytes; later bytes do not move the deadline)
        timeout = tracker.limits.header_timeout
        if tracker.draining:
            timeout = min(timeout, tracker.idle_grace)
        if timeout > 0:
            self._header_timer = self._loop.call_at(now + timeout, self._header_late)

    def _feed_shedding(self, data: bytes, admission: Admission, now: float) -> None:
        """aiohttp's ``data_received`` for a connection parked between requests while
        the worker sheds load (:attr:`Admission.pacing`): a request that
        :meth:`Admission.shed_on_read` refuses is answered 503 here, as it is read, and
        never queued, so no task, request object or response is made for it and the
        answer does not wait for the handlers ahead. Only a whole request without a
        body that keeps its HTTP/1.1 connection alive, and not a probe; anything else
        is queued as aiohttp queues it (the same steps: ``tests/test_handling.py`` holds
        aiohttp's version this follows, and fails when it changes)."""
        parser = self._parser
        if (
            parser is None
            or self._payload_parser is not None
            or self._upgraded
            or self._force_close
            or self._close
            or not self._keepalive_timeout
        ):
            _data_received(self, data)
            return
        messages: list[tuple[Any, Any]]
        try:
            messages, upgraded, tail = parser.feed_data(data)
        except HttpProcessingError as exc:
            messages = [(_ErrInfo(status=400, exc=exc, message=exc.message), EMPTY_PAYLOAD)]
            upgraded, tail = False, b""
        if len(messages) == 1 and not upgraded:
            message, payload = messages[0]
            if (
                payload is EMPTY_PAYLOAD
                and type(message) is RawRequestMessage
                and (reason := self._shed_reason(message, admission, now)) is not None
            ):
                self._request_count += 1
                consumed = getattr(parser, "message_consumed", None)  # aiohttp >= 3.14
                if consumed is not None:
                    consumed()
                self._shed_now(reason, now)
                return
        # aiohttp's steps: queue them, wake the request loop, pause a full queue
        for item in messages:
            self._request_count += 1
            self._messages.append(item)
        waiter = self._waiter
        if messages and waiter is not None and not waiter.done():
            waiter.set_result(None)
        most = getattr(self, "_max_msg_queue_size", 0)  # aiohttp >= 3.14
        if most and not self._buffer_paused and len(self._messages) >= most:
            self._pause_reading_for_buffer()
        self._upgraded = upgraded
        if upgraded and tail:
            self._message_tail = tail

    def _shed_reason(
        self, message: RawRequestMessage, admission: Admission, now: float
    ) -> str | None:
        """Why to refuse ``message`` as it is read, or None (it goes on to be handled)."""
        if (
            message.method == "HEAD"
            or message.version != HttpVersion11
            or message.should_close
            or message.upgrade
        ):
            return None  # answered by the usual path, which knows how to close or not
        path = message.path
        if not _plain(path):
            path = message.url.path  # decoded, as request.path
        if path in self.tracker.exempt_paths:
            return None
        priority = Priority.NORMAL
        if admission.classifies:
            header = admission.settings.priority_header
            mark = message.headers.get(header) if header else None
            priority = admission.priority_of(path, mark)
        return admission.shed_on_read(now, priority)

    def _shed_now(self, reason: str, now: float) -> None:
        """Answer the request just read with the 503 of ``reason`` (the usual path's
        status, headers and body); the connection stays open for the next request,
        under aiohttp's keep-alive timeout as after any response."""
        self._cancel_header_timer()  # its line and headers are complete
        transport = self.transport
        assert transport is not None
        transport.write(_shed_raw(reason))
        self._keepalive = True
        close_time = now + self._keepalive_timeout
        self._next_keepalive_close_time = close_time
        if self._keepalive_handle is None:
            self._keepalive_handle = self._loop.call_at(close_time, self._process_keepalive)

    @property
    def request_arriving(self) -> bool:
        """Bytes of a request have come, and its line and headers are not complete yet."""
        return self._header_timer is not None

    def hurry_header(self, when: float) -> None:
        """The drain began: a request still arriving must be complete by ``when`` (loop
        time), if its own header deadline is later."""
        timer = self._header_timer
        if timer is not None and when < timer.when():
            timer.cancel()
            self._header_timer = asyncio.get_running_loop().call_at(when, self._header_late)

    async def _handle_request(
        self,
        request: web.BaseRequest,
        start_time: float | None,
        request_handler: RequestHandlerFunc,
    ) -> tuple[web.StreamResponse, bool]:
        """aiohttp's handling of one request, tracked: refused at a limit, or counted in
        flight from its handler's start until its response is written.

        An admitted request is handled here as aiohttp's ``_handle_request`` does (the
        same steps, in the same order: the handler, its exceptions as 500, 504 or their
        own response, ``finish_response``, then the flags aiohttp's shutdown waits on),
        not by awaiting it: a coroutine less per request. ``tests/test_handling.py``
        holds aiohttp's version this follows, and fails when it changes."""
        timer = self._header_timer
        if timer is not None:  # its line and headers are complete
            timer.cancel()
            self._header_timer = None
        if request_handler is not self._request_handler:
            # a request aiohttp could not parse (414, 431, 400): answered by its error
            # handler, not the application's; nothing of it is tracked
            return await _handle_request(self, request, start_time, request_handler)
        tracker = self.tracker
        body = type(request._payload) is not EmptyStreamReader  # request.body_exists
        began = 0.0  # the clock read for admission, when it did not wait (else read again)
        if body or tracker.gated:
            # a limit may refuse it, admission control may queue or shed it
            if body or tracker.max_concurrency:
                refusal = tracker.refusal(request)
                if refusal is not None:
                    refuse = (
                        _raising(refusal)
                        if isinstance(refusal, web.HTTPException)
                        else _answering(refusal)
                    )
                    return await _handle_request(self, request, start_time, refuse)
            admission = tracker.admission
            if (
                admission is not None
                and self.main
                and not request._message.upgrade  # a WebSocket lives on: not timed, not held
                and _path(request) not in tracker.exempt_paths
            ):
                if not admission.engaged:
                    began = time.monotonic()
                    if (
                        began - self.last_rx > admission.engage_wait
                        or len(tracker.inflight) >= admission.engage_inflight
                    ):
                        tracker.engage()  # pressure: it waited for the loop, or many run
                if not admission.engaged:
                    # no pressure: let in and counted; one every sample_gap timed
                    admission.admitted += 1
                    if began - admission.timed_at >= admission.sample_gap:
                        admission.timed_at = began
                        self.admitted_at = admission.clock()
                        self.timed = True
                else:
                    if admission.plain:  # every request normal, no rate per client
                        shed = admission.admit(self.last_rx, NORMAL, None, self.rx_cpu)
                    else:
                        shed = tracker.admit(self, request, admission)
                    let_in = admission.last_busy  # when admit() decided
                    if shed is not None and not isinstance(shed, str):
                        shed = await tracker.queued(admission, shed)
                        let_in = admission.clock()  # after its wait in the queue
                        began = 0.0
                    if shed is not None:
                        refused = _answering(_shed(shed))
                        return await _handle_request(self, request, start_time, refused)
                    self.admitted_at = let_in
            if tracker.limits.request_timeout and _path(request) not in tracker.exempt_paths:
                request_handler = functools.partial(tracker.bounded, request_handler)
            if body and self.main:
                tracker.body_bytes_in += request.content_length or 0
        # the handler starts
        access = self.access
        if access is not None:
            access.begin(self, request)
        self.request_began = began or time.monotonic()
        tracker.requests_total += 1
        if tracker.requests_total == tracker.request_limit and tracker.on_limit is not None:
            tracker.on_limit()
        tracker.inflight[self] = request
        if tracker.draining:
            tracker._cancel_timer(self)  # a drain's idle grace: the connection is not idle
        response: web.StreamResponse | None = None  # None: cancelled
        try:
            self._request_in_progress = True
            try:
                try:
                    self._current_request = request
                    answer = await request_handler(request)
                finally:
                    self._current_request = None
            except web.HTTPException as exc:
                answer, reset = await self.finish_response(request, exc, start_time)
            except asyncio.CancelledError:
                raise
            except TimeoutError as exc:
                self.log_debug("Request handler timed out.", exc_info=exc)
                answer = self.handle_error(request, 504)
                answer, reset = await self.finish_response(request, answer, start_time)
            except Exception as exc:
                answer = self.handle_error(request, 500, exc)
                answer, reset = await self.finish_response(request, answer, start_time)
            else:
                if getattr(answer, "__http_exception__", False):
                    warnings.warn(
                        "returning HTTPException object is deprecated (#2415) and will be "
                        "removed, please raise the exception instead",
                        DeprecationWarning,
                        stacklevel=1,
                    )
                answer, reset = await self.finish_response(request, answer, start_time)
            finally:
                self._request_in_progress = False
                if (waiter := self._handler_waiter) is not None:
                    waiter.set_result(None)
            response = answer
            return answer, reset
        finally:
            # answered (its response written), or cancelled (None)
            del tracker.inflight[self]
            if response is not None and self.main:
                tracker.response_bytes += response._body_length  # as written, headers too
                if access is not None and access.enabled:
                    access.ended(self, request, response)
            self.request_began = 0.0  # no request being handled (for the counts at prepare)
            if self.admitted_at is not None:
                self.settle()
            if self.streaming:
                self.streaming = False
                tracker.streams -= 1
            if tracker.draining:
                tracker.ended(self)

    def settle(self) -> None:
        """Admission control is done with this connection's request: released from its
        count in flight, or, let in while it was not engaged, its time sampled."""
        admitted_at = self.admitted_at
        admission = self.tracker.admission
        if admitted_at is None or admission is None:
            return
        self.admitted_at = None
        if self.timed:
            self.timed = False
            admission.sample(admitted_at)
        else:
            admission.release(admitted_at)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_late(self) -> None:
        self._header_timer = None
        if self.transport is None or in_progress(self) or queued_requests(self):
            return  # a request got through meanwhile (never a 408 into a response)
        self.tracker.rejected["header_timeout"] += 1
        log.debug("request headers not complete in time: 408", extra={"SDSERVE_PHASE": "limit"})
        self.transport.write(_REQUEST_TIMEOUT)
        self.force_close()  # the transport writes what it holds, then closes

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request over a size limit gets 414 or 431 (aiohttp says 400), counted, and
        without aiohttp's traceback in the log (a flood of them is an attack, not a bug)."""
        limits = self.tracker.limits
        reason = ""
        if status == 400 and isinstance(exc, LineTooLong):
            line = exc.args[1] == limits.max_request_line != limits.max_header_size
            status, reason = (414, "request_line_too_long") if line else (431, "header_too_large")
        elif status == 400 and isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc):
            status, reason = 431, "too_many_headers"
        if not reason:
            return super().handle_error(request, status, exc, message)
        self.tracker.rejected[reason] += 1
        log.debug("refused a request: %s (%d)", reason, status, extra={"SDSERVE_PHASE": "limit"})
        response = web.Response(status=status, text=f"{reason.replace('_', ' ')}\n")
        response.force_close()
        return response


def _plain(target: str) -> bool:
    """A request target that is a path with no query and no escape: its own decoded
    path (no URL to parse for it)."""
    return target[:1] == "/" and "?" not in target and "%" not in target


def _path(request: web.BaseRequest) -> str:
    """``request.path`` (decoded), without decoding a plain one."""
    raw: str = request._message.path
    return raw if _plain(raw) else request.path


def _raising(exc: web.HTTPException) -> RequestHandlerFunc:
    """A handler that answers with ``exc`` (a limit's status), as aiohttp answers a raise."""

    async def refuse(request: web.BaseRequest) -> web.StreamResponse:
        raise exc

    return refuse


def _answering(response: web.StreamResponse) -> RequestHandlerFunc:
    """A handler that answers with ``response`` (a refusal)."""

    async def answer(request: web.BaseRequest) -> web.StreamResponse:
        return response

    return answer


def _one_request_with_body(proto: TrackedRequestHandler, data: bytes, queued: int) -> bool:
    """``data`` (read from a boundary) is exactly one request with a Content-Length body."""
    messages = getattr(proto, "_messages", None)
    if messages is None or len(messages) != queued + 1:
        return False
    message = messages[-1][0]
    length = getattr(message, "headers", {}).get("Content-Length", "")
    if not length.isdigit() or getattr(message, "chunked", False):
        return False
    end = data.find(b"\r\n\r\n")
    return end >= 0 and len(data) - (end + 4) == int(length)


_SHED_BODY = b"overloaded, retry shortly\n"
_SHED_REASON = {
    "limit": "concurrency limit",
    "queue_deadline": "queue deadline",
    "client_rate": "client rate",
}


def _shed(reason: str) -> web.Response:
    """The 503 of a refused request (built cheaply: a refusal must cost far less than
    the work it saves)."""
    return web.Response(
        status=503,
        body=_SHED_BODY,
        content_type="text/plain",
        headers={"Retry-After": "1", "X-Sdserve-Shed": _SHED_REASON.get(reason, reason)},
    )


#: (reason, Date) -> the bytes of a refusal as read (renewed each second, with the Date)
_shed_bytes: dict[tuple[str, str], bytes] = {}


def _shed_raw(reason: str) -> bytes:
    """The bytes of :func:`_shed`'s response, written as the request is read."""
    date = rfc822_formatted_time()  # aiohttp's, renewed each second
    got = _shed_bytes.get((reason, date))
    if got is None:
        if len(_shed_bytes) > 2 * len(_SHED_REASON):
            _shed_bytes.clear()  # an earlier second's
        got = _shed_bytes[(reason, date)] = _render_shed(reason, date)
    return got


def _render_shed(reason: str, date: str) -> bytes:
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: text/plain\r\n"
        "Retry-After: 1\r\n"
        f"X-Sdserve-Shed: {_SHED_REASON.get(reason, reason)}\r\n"
        f"Content-Length: {len(_SHED_BODY)}\r\n"
        f"Date: {date}\r\n"
        f"Server: {SERVER_SOFTWARE}\r\n\r\n"
    )
    return head.encode("latin-1") + _SHED_BODY


def set_nodelay(sock: socket.socket) -> None:
    """TCP_NODELAY on an accepted TCP connection (a no-op for unix sockets)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
