"""Access logs and trace ids.

With ``access_log = true``, each request of the main socket is logged once it is answered
(logger ``sdserve.access``): method, path, status, duration, bytes in and out, the
client's address (the real one behind ``trusted_proxies``), the user agent, the request
id and the trace id. The lines go through sdserve's log target: in the journal each
value is a field of its own (``SDSERVE_METHOD``, ``SDSERVE_PATH``, ``SDSERVE_STATUS``,
``SDSERVE_DURATION_MS``, ``SDSERVE_BYTES_IN``, ``SDSERVE_BYTES_OUT``, ``SDSERVE_CLIENT``,
``SDSERVE_USER_AGENT``, ``SDSERVE_REQUEST_ID``, ``SDSERVE_TRACE_ID``, with
``SDSERVE_PHASE=access``); with ``access_log_format = "json"`` they are JSON lines on
stdout instead (for containers), one object per request with the same keys in lower
case. A text line (stderr without the journal) is for people: the message, which holds
the values, then only the fields it lacks (``SDSERVE_PHASE``, ``SDSERVE_BYTES_IN``,
``SDSERVE_TRACE_ID``); programs read the journal's fields or the JSON lines.

- The health probes (and ``/metrics``) are left out unless ``access_log_probes``.
- ``access_log_sample`` logs that share of the requests (chosen at random); a 5xx is
  always logged.
- Logging never blocks the event loop, and costs it little. No middleware: sdserve's
  protocol (:class:`sdserve.drain.TrackedRequestHandler`) calls :meth:`AccessLog.begin`
  before the handler, :meth:`AccessLog.prepared` as the response's headers go out and
  :meth:`AccessLog.ended` once it is written. For a text line the loop makes the line
  itself, in one f-string of what it already has (the parsed request line and headers,
  the status, the timing): fewer steps in all than a tuple that a thread unpacks and
  formats later. For JSON and the journal it appends a tuple of those values, and the
  thread makes the line. Either goes to a bounded queue, and a thread of the access
  log's own writes them in batches (one ``write`` for many lines, each text line behind
  the time, to the second, as the batch is written; one datagram per entry to
  journald), bypassing :mod:`logging` (whose records cost the loop some 40 us each).
  When the queue is full an entry is dropped and counted
  (``sdserve_log_lines_dropped_total``).

Trace ids (W3C Trace Context): a valid ``traceparent`` header gives the request's trace
id; without one, a new one is generated: 128 random bits, sliced from hex text of the
kernel's random bytes drawn a few KiB at a time (no system call and no random draw per
request; a forked process draws its own). The application finds it in
``request["trace_id"]`` (or :func:`trace_id`); the response carries ``traceparent``
(the same trace id, with a span id of this server's) and ``X-Request-Id`` (the client's
own if it sent a sane one, else the trace id). Trace ids are on with the access log, or
alone with ``trace_ids = true``.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import threading
import time
from collections import deque
from collections.abc import Set as AbstractSet
from json.encoder import encode_basestring
from time import monotonic
from time import time as wall_clock
from typing import Any, Literal, Protocol

from aiohttp import web
from multidict import istr

from .journal import JournalSender
from .log import NOTE_INTERVAL, LogQueue, StderrFormatter, fields

_log = logging.getLogger("sdserve.accesslog")

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
#: a client's own request id, taken as it is (nothing in it needs escaping in JSON)
_REQUEST_ID = re.compile(r"[\w.:/+=@-]{1,128}\Z")
_ZERO_TRACE = "0" * 32
# header names as multidict's istr: no case folding per look-up
_TRACEPARENT_HEADER = istr("traceparent")
_REQUEST_ID_HEADER = istr("X-Request-Id")
_CONTENT_LENGTH_HEADER = istr("Content-Length")
_USER_AGENT_HEADER = istr("User-Agent")
#: random bytes drawn at a time for trace and span ids (a request takes 24 of them)
RANDOM_POOL = 3072
TRACE_KEY = "trace_id"
REQUEST_ID_KEY = "request_id"


def trace_id(request: web.Request) -> str | None:
    """The request's trace id (None when trace ids are off)."""
    value = request.get(TRACE_KEY)
    return value if isinstance(value, str) else None


def parse_traceparent(value: str | None) -> str | None:
    """The trace id of a valid ``traceparent`` header, else None."""
    if not value:
        return None
    found = _TRACEPARENT.match(value.strip().lower())
    if found is None or found.group(1) == _ZERO_TRACE or value.startswith("ff"):
        return None
    return found.group(1)


#: entries waiting for the writer; past this they are dropped and counted
QUEUE_SIZE = 10_000
#: seconds the writer lets entries gather before it writes them
BATCH_PAUSE = 0.05
#: what the loop queues for JSON and the journal: (time, method, path, status, seconds,
#: the request's Content-Length header, the response's, the bytes written of it (headers
#: too), the client behind a trusted proxy or None, the connection's peer, user agent,
#: request id, trace id): values it already has, as they are; the writer thread makes
#: the line of each in one call (:func:`json_line`, :func:`journal_entry`). For text the
#: loop queues the line itself (:meth:`AccessLog.ended`), without its time stamp
Entry = tuple[float, str, str, int, float, str, "str | None", int, "str | None", Any, str, str, str]
Target = Literal["journal", "stderr", "syslog-stderr", "json"]


def current_target() -> Target:
    """Where sdserve's own log goes (sdserve.log's set-up): the journal, or stderr (with
    ``<N>`` prefixes under systemd)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, LogQueue):
            target = handler.target
            if type(target).__name__ == "JournalHandler":
                return "journal"
            formatter = target.formatter
            if isinstance(formatter, StderrFormatter) and formatter.syslog_prefix:
                return "syslog-stderr"
    return "stderr"


def _count_text(header: str | None) -> str:
    """A Content-Length header's value as a plain decimal (JSON's too), else ""."""
    if header and header.isascii() and header.isdigit():
        return header if header[0] != "0" or header == "0" else str(int(header))
    return ""


def _peer_text(peer: Any) -> str:
    """The client's address from a peer name that is not an IP address's tuple."""
    return str(peer[0]) if isinstance(peer, list | tuple) else str(peer or "-")


# Each line's function is whole, without a helper for what they share: the writer calls
# one per entry, and a call and a tuple more would cost a tenth of a line. The text and
# the journal's numbers are what went over the wire; JSON's are checked to be plain
# decimals (a header an application set may hold anything, and JSON allows no "0012").
# A text line is for people: the message, which holds the values, then as ``NAME=value``
# the fields the message lacks (a user agent may hold spaces and quotes, which a text
# line cannot delimit: a program reads the journal's fields or the JSON lines).


def journal_entry(e: Entry) -> bytes:
    """An entry in the journal's native protocol: ``NAME=value`` lines. No value here can
    hold a newline (HTTP forbids one in a request line or a header; ids and numbers are
    plain)."""
    _t, method, path, status, seconds, bytes_in, out, written, client, peer, agent, rid, trace = e
    if client is None:
        client = peer[0] if type(peer) is tuple else _peer_text(peer)
    sent = out if out and out != "0" else written
    ms = f"{seconds * 1000:.3f}"
    status_text = str(status)  # once: each line holds it twice
    return (
        f'MESSAGE={client} "{method} {path}" {status_text} {sent} {ms}ms "{agent}" {rid}\n'
        "PRIORITY=6\nSYSLOG_IDENTIFIER=sdserve\nLOGGER=sdserve.access\n"
        f"SDSERVE_PHASE=access\nSDSERVE_METHOD={method}\nSDSERVE_PATH={path}\n"
        f"SDSERVE_STATUS={status_text}\nSDSERVE_DURATION_MS={ms}\nSDSERVE_BYTES_IN={bytes_in}\n"
        f"SDSERVE_BYTES_OUT={sent}\nSDSERVE_CLIENT={client}\nSDSERVE_USER_AGENT={agent}\n"
        f"SDSERVE_REQUEST_ID={rid}\nSDSERVE_TRACE_ID={trace}\n"
    ).encode("utf-8", "replace")


def json_line(e: Entry) -> str:
    """An entry as one JSON object on a line. The method (an HTTP token), the request id
    (matched by :data:`_REQUEST_ID`) and the trace id (hex) need no escaping."""
    t, method, path, status, seconds, length, header, written, client, peer, agent, rid, trace = e
    if client is None:
        client = peer[0] if type(peer) is tuple else _peer_text(peer)
    out = _count_text(header)
    if not out or out == "0":
        out = str(written)
    q = encode_basestring
    return (
        f'{{"time":{t:.6f},"method":"{method}","path":{q(path)},"status":{status},'
        f'"duration_ms":{seconds * 1000:.3f},"bytes_in":{_count_text(length) or "0"},'
        f'"bytes_out":{out},"client":{q(client)},"user_agent":{q(agent)},'
        f'"request_id":"{rid}","trace_id":"{trace}"}}\n'
    )


class AccessWriter(threading.Thread):
    """Formats and writes the queued entries: the loop only appends a tuple to
    :attr:`pending` and sets :attr:`wake` (:meth:`AccessLog.ended`), or counts it in
    :attr:`dropped` when ``limit`` are waiting."""

    def __init__(self, target: Target, limit: int = QUEUE_SIZE) -> None:
        super().__init__(name="sdserve-access-log", daemon=True)
        self.target = target
        self.limit = limit
        #: text lines (without their time stamp), or entries for JSON and the journal
        self.pending: deque[Entry | str] = deque()
        self.wake = threading.Event()
        self.dropped = 0
        #: drops already said in sdserve's own log, and when it may say more
        self.reported = 0
        self._next_note = 0.0
        self._stopping = False
        self._ending = threading.Event()
        self._journal = JournalSender() if target == "journal" else None
        self._fd = 1 if target == "json" else 2
        self._pid = os.getpid()
        #: the text lines' prefix, and the second its time stamp is of
        self._second = -1
        self._prefix = ""

    def stop(self, timeout: float = 2.0) -> None:
        """Write what is queued, for at most ``timeout`` seconds."""
        self._stopping = True
        self._ending.set()
        self.wake.set()
        self.join(timeout)

    def run(self) -> None:
        pending = self.pending
        while True:
            self.wake.wait()
            if not self._stopping:
                # let a batch gather: one write for many lines, and few wake-ups of this
                # thread competing with the event loop for the GIL (a pause, not a wait)
                self._ending.wait(BATCH_PAUSE)
            self.wake.clear()
            batch: list[Any] = []
            take, keep = pending.popleft, batch.append
            while pending:  # to empty: the loop wakes this thread only for an empty queue
                keep(take())
            if batch:
                self._write(batch)
            self._report()
            if self._stopping and not pending:
                return

    def _write(self, batch: list[Any]) -> None:
        try:
            if self._journal is not None:
                send = self._journal.send
                for entry in map(journal_entry, batch):
                    send(entry)
                return
            if self.target == "json":
                text = "".join(map(json_line, batch))
            else:
                # each line behind its prefix, in one join (the lines end with "\n"): the
                # time stamp, or "<6>" under systemd, which stamps the lines itself
                prefix = "<6>" if self.target == "syslog-stderr" else self._stamp(wall_clock())
                text = prefix + prefix.join(batch)
            data = memoryview(text.encode("utf-8", "replace"))
            while data:
                data = data[os.write(self._fd, data) :]
        except OSError as exc:
            # the log target is gone or broken: count the lines lost, as a full queue does
            self.dropped += len(batch)
            if exc.errno == errno.EBADF:
                self._stopping = True

    def _stamp(self, t: float) -> str:
        """A text line's prefix: the time (to the second) and the logger."""
        second = int(t)
        if second != self._second:  # localtime() is slow: once a second
            self._second = second
            stamp = time.strftime("%H:%M:%S", time.localtime(second))
            self._prefix = f"{stamp} INFO    sdserve.access[{self._pid}]: "
        return self._prefix

    def _report(self) -> None:
        """Say in sdserve's own log how many lines were dropped, once the target took a
        batch again (the first write after a stall), and at most every NOTE_INTERVAL."""
        dropped = self.dropped
        if dropped <= self.reported or monotonic() < self._next_note:
            return
        lost = dropped - self.reported
        self.reported = dropped
        self._next_note = monotonic() + NOTE_INTERVAL
        _log.warning(
            "%d access log line(s) dropped: the log target did not keep up (%d in all)",
            lost,
            dropped,
            extra=fields("log-dropped", dropped=lost, dropped_total=dropped),
        )


class Connection(Protocol):
    """What the access log reads and writes of sdserve's protocol (per request)."""

    trace: str
    #: this server's span id (the traceparent of its response)
    span: str
    request_id: str
    #: the client behind a trusted proxy (:mod:`sdserve.proxies`), else None
    client: str | None
    request_began: float


class AccessLog:
    """Trace ids and access log lines of one worker's application socket(s), called by
    sdserve's protocol at the request's start, its response's prepare and its end."""

    def __init__(
        self,
        *,
        enabled: bool,
        sample: float,
        probes: bool,
        exempt: AbstractSet[str],
        writer: AccessWriter | None = None,
    ) -> None:
        self.enabled = enabled and writer is not None
        self.sample = sample
        self.probes = probes
        #: paths left out of the log (the health probes), read at each request
        self.exempt = exempt
        self.writer = writer
        #: the writer's queue and its bound, read at each request
        self._pending: deque[Entry | str] = writer.pending if writer is not None else deque()
        self._limit = writer.limit if writer is not None else 0
        #: the loop makes text lines itself (see :meth:`ended`)
        self._text = writer is not None and writer.target in ("stderr", "syslog-stderr")
        #: random hex text, the next id's place in it, and its end (drawn afresh then)
        self._random = ""
        self._next = self._end = 0

    def begin(self, conn: Connection, request: web.BaseRequest) -> None:
        """Before the handler: the request's trace id and request id, on ``conn`` and in
        ``request["trace_id"]`` and ``request["request_id"]`` for the application."""
        headers = request._message.headers  # request.headers, without a property call
        start = self._next
        if start >= self._end:
            self._random = os.urandom(RANDOM_POOL).hex()
            self._end, start = len(self._random), 0
        self._next = end = start + 48  # a trace id (32 hex digits), a span id (16)
        random_hex = self._random
        conn.span = random_hex[start + 32 : end]
        given = headers.get(_TRACEPARENT_HEADER)
        trace = (given and parse_traceparent(given)) or random_hex[start : start + 32]
        # request[...] = ..., without aiohttp's check of the key's type per call
        state = request._state
        state[TRACE_KEY] = conn.trace = trace
        rid = headers.get(_REQUEST_ID_HEADER)
        if not rid or not _REQUEST_ID.match(rid):
            rid = trace
        state[REQUEST_ID_KEY] = conn.request_id = rid
        conn.client = None

    @staticmethod
    def prepared(conn: Connection, response: web.StreamResponse) -> None:
        """The response's headers are about to go out: the trace id (with a span id of this
        server's) and the request id go with them."""
        headers = response._headers  # response.headers, without a property call
        headers[_TRACEPARENT_HEADER] = f"00-{conn.trace}-{conn.span}-01"
        headers[_REQUEST_ID_HEADER] = conn.request_id

    def ended(
        self, conn: Connection, request: web.BaseRequest, response: web.StreamResponse
    ) -> None:
        """The response is written: its line, unless it is a probe's or not sampled (a 5xx
        always is)."""
        status = response._status  # response.status, without a property call
        sample = self.sample
        if sample < 1.0 and status < 500 and (sample <= 0.0 or random.random() >= sample):
            return
        message = request._message  # the request line and headers as aiohttp parsed them
        path = message.path
        if not self.probes and (
            path in self.exempt or ("?" in path and path.partition("?")[0] in self.exempt)
        ):
            return
        pending = self._pending
        if len(pending) >= self._limit:
            self.writer.dropped += 1  # type: ignore[union-attr]
            return
        headers = message.headers
        if self._text:
            # the line itself, in one f-string: the message (which holds the values), then
            # the fields it lacks; a body's bytes as its Content-Length says, else (a stream,
            # or none) as written, headers included
            client = conn.client
            if client is None:
                peer = request._transport_peername
                client = peer[0] if type(peer) is tuple else _peer_text(peer)
            out = response._headers.get(_CONTENT_LENGTH_HEADER)
            pending.append(
                f'{client} "{message.method} {path}" {status} '
                f"{out if out and out != '0' else response._body_length} "
                f"{(monotonic() - conn.request_began) * 1000:.3f}ms "
                f'"{headers.get(_USER_AGENT_HEADER, "-")}" {conn.request_id} SDSERVE_PHASE=access '
                f"SDSERVE_BYTES_IN={headers.get(_CONTENT_LENGTH_HEADER, '0')} "
                f"SDSERVE_TRACE_ID={conn.trace}\n"
            )
        else:
            pending.append(
                (
                    wall_clock(),
                    message.method,
                    path,
                    status,
                    monotonic() - conn.request_began,
                    headers.get(_CONTENT_LENGTH_HEADER, "0"),
                    response._headers.get(_CONTENT_LENGTH_HEADER),
                    response._body_length,
                    conn.client,
                    request._transport_peername,
                    headers.get(_USER_AGENT_HEADER, "-"),
                    conn.request_id,
                    conn.trace,
                )
            )
        if len(pending) == 1:
            # the first since the writer emptied the queue (the loop alone appends, so
            # every entry after it is either drained with it or finds the queue empty)
            self.writer.wake.set()  # type: ignore[union-attr]
