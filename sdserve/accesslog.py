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
case.

- The health probes (and ``/metrics``) are left out unless ``access_log_probes``.
- ``access_log_sample`` logs that share of the requests (chosen at random); a 5xx is
  always logged.
- Logging never blocks the event loop, and costs it little. No middleware: sdserve's
  protocol (:class:`sdserve.drain.TrackedRequestHandler`) calls :meth:`AccessLog.begin`
  before the handler, :meth:`AccessLog.prepared` as the response's headers go out and
  :meth:`AccessLog.ended` once it is written. The loop appends a tuple of what it
  already has (the parsed request line and headers, the status, the timing) to a
  bounded queue, and a thread of the access log's own picks the fields out, formats
  them and writes them in batches (one ``write`` for many lines; one datagram per entry
  to journald), bypassing :mod:`logging` (whose records cost the loop some 40 us each).
  When the queue is full an entry is dropped and counted
  (``sdserve_log_lines_dropped_total``).

Trace ids (W3C Trace Context): a valid ``traceparent`` header gives the request's trace
id; without one, a new one is generated: 64 random bits of the process's, then the
process's request count scrambled by an odd multiplier (a bijection of 64-bit numbers).
So ids are unique, and their low half, which samplers read as a random number, is spread
evenly; it costs no system call and no random draw per request. The application finds it in
``request["trace_id"]`` (or :func:`trace_id`); the response carries ``traceparent``
(the same trace id, with a span id of this server's) and ``X-Request-Id`` (the client's
own if it sent a sane one, else the trace id). Trace ids are on with the access log, or
alone with ``trace_ids = true``.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import random
import re
import threading
import time
from collections import deque
from collections.abc import Set as AbstractSet
from random import getrandbits
from typing import Any, Literal, Protocol

from aiohttp import web
from multidict import istr

from .journal import JournalSender
from .log import NOTE_INTERVAL, LogQueue, StderrFormatter, fields

_log = logging.getLogger("sdserve.accesslog")

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_REQUEST_ID = re.compile(r"^[\w.:/+=@-]{1,128}$")
_ZERO_TRACE = "0" * 32
# header names as multidict's istr: no case folding per look-up
_TRACEPARENT_HEADER = istr("traceparent")
_REQUEST_ID_HEADER = istr("X-Request-Id")
_CONTENT_LENGTH_HEADER = istr("Content-Length")
_USER_AGENT_HEADER = istr("User-Agent")
#: trace ids' low half: the request count times this (odd: a bijection modulo 2**64)
_SCRAMBLE = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1
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


#: the names of a line's values, in the order :func:`_values` gives them
FIELDS = (
    "METHOD",
    "PATH",
    "STATUS",
    "DURATION_MS",
    "BYTES_IN",
    "BYTES_OUT",
    "CLIENT",
    "USER_AGENT",
    "REQUEST_ID",
    "TRACE_ID",
)
#: entries waiting for the writer; past this they are dropped and counted
QUEUE_SIZE = 10_000
#: seconds the writer lets entries gather before it writes them
BATCH_PAUSE = 0.05
#: what the loop queues: (time, method, path, status, seconds, the request's
#: Content-Length header, the response's, the bytes written of it (headers too), the
#: client behind a trusted proxy or None, the connection's peer, user agent, request id,
#: trace id): values it already has, as they are; the writer thread turns them into the
#: log's (:func:`_values`)
Entry = tuple[float, str, str, int, float, str, "str | None", int, "str | None", Any, str, str, str]
Values = tuple[float, str, str, str, str, str, str, str, str, str, str, str]
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


def _values(e: Entry) -> Values:
    """A queued entry's values as the text the log's lines hold, each converted once,
    numbers as plain decimals (valid JSON too): the time, then those of :data:`FIELDS`
    in order, with the message's duration (rounded to 0.1 ms) after DURATION_MS."""
    t, method, path, status, seconds, length, out_length, written, client, peer = e[:10]
    if client is None:
        client = str(peer[0]) if isinstance(peer, (list, tuple)) else str(peer or "-")
    # the body's length; a streamed one's (no Content-Length), or none: what was written
    out = _count_text(out_length)
    if not out or out == "0":
        out = str(written)
    ms = round(seconds * 1000, 3)
    return (t, method, path, str(status), repr(ms), f"{ms:.1f}", _count_text(length) or "0",
            out, client, e[10], e[11], e[12])  # fmt: skip


class AccessWriter(threading.Thread):
    """Formats and writes the queued entries: the loop only appends a tuple to
    :attr:`pending` and sets :attr:`wake` (:meth:`AccessLog.ended`), or counts it in
    :attr:`dropped` when ``limit`` are waiting."""

    def __init__(self, target: Target, limit: int = QUEUE_SIZE) -> None:
        super().__init__(name="sdserve-access-log", daemon=True)
        self.target = target
        self.limit = limit
        self.pending: deque[Entry] = deque()
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
            batch = []
            while pending:
                batch.append(pending.popleft())
            if batch:
                self._write(batch)
            self._report()
            if self._stopping and not pending:
                return

    def _write(self, batch: list[Entry]) -> None:
        try:
            if self._journal is not None:
                for entry in batch:
                    self._journal.send(self._journal_entry(_values(entry)))
                return
            if self.target == "json":
                text = "".join([_json_line(_values(e)) for e in batch])
            else:
                text = "".join([self._text_line(_values(e)) for e in batch])
            data = memoryview(text.encode("utf-8", "replace"))
            while data:
                data = data[os.write(self._fd, data) :]
        except OSError as exc:
            # the log target is gone or broken: count the lines lost, as a full queue does
            self.dropped += len(batch)
            if exc.errno == errno.EBADF:
                self._stopping = True

    def _report(self) -> None:
        """Say in sdserve's own log how many lines were dropped, once the target took a
        batch again (the first write after a stall), and at most every NOTE_INTERVAL."""
        dropped = self.dropped
        if dropped <= self.reported or time.monotonic() < self._next_note:
            return
        lost = dropped - self.reported
        self.reported = dropped
        self._next_note = time.monotonic() + NOTE_INTERVAL
        _log.warning(
            "%d access log line(s) dropped: the log target did not keep up (%d in all)",
            lost,
            dropped,
            extra=fields("log-dropped", dropped=lost, dropped_total=dropped),
        )

    def _text_line(self, e: Values) -> str:
        t, method, path, status, ms, short, bytes_in, out, client, agent, rid, trace = e
        if self.target == "syslog-stderr":
            prefix = "<6>"
        else:
            second = int(t)
            if second != self._second:  # localtime() is slow: once a second
                self._second = second
                stamp = time.strftime("%H:%M:%S", time.localtime(t))
                self._prefix = f"{stamp} INFO    sdserve.access[{self._pid}]: "
            prefix = self._prefix
        return (
            f'{prefix}{client} "{method} {path}" {status} {out} {short}ms "{agent}" {rid} '
            f"SDSERVE_PHASE=access SDSERVE_METHOD={method} SDSERVE_PATH={path} "
            f"SDSERVE_STATUS={status} SDSERVE_DURATION_MS={ms} SDSERVE_BYTES_IN={bytes_in} "
            f"SDSERVE_BYTES_OUT={out} SDSERVE_CLIENT={client} SDSERVE_USER_AGENT={agent} "
            f"SDSERVE_REQUEST_ID={rid} SDSERVE_TRACE_ID={trace}\n"
        )

    @staticmethod
    def _journal_entry(e: Values) -> bytes:
        # the native protocol's NAME=value lines: no value here can hold a newline (HTTP
        # forbids one in a request line or a header; ids and numbers are plain)
        _t, method, path, status, ms, short, bytes_in, out, client, agent, rid, trace = e
        return (
            f'MESSAGE={client} "{method} {path}" {status} {out} {short}ms "{agent}" {rid}\n'
            "PRIORITY=6\nSYSLOG_IDENTIFIER=sdserve\nLOGGER=sdserve.access\n"
            f"SDSERVE_PHASE=access\nSDSERVE_METHOD={method}\nSDSERVE_PATH={path}\n"
            f"SDSERVE_STATUS={status}\nSDSERVE_DURATION_MS={ms}\nSDSERVE_BYTES_IN={bytes_in}\n"
            f"SDSERVE_BYTES_OUT={out}\nSDSERVE_CLIENT={client}\nSDSERVE_USER_AGENT={agent}\n"
            f"SDSERVE_REQUEST_ID={rid}\nSDSERVE_TRACE_ID={trace}\n"
        ).encode("utf-8", "replace")


def _json_line(e: Values) -> str:
    t, method, path, status, ms, _short, bytes_in, out, client, agent, rid, trace = e
    q = _quote
    return (
        f'{{"time":{t:.6f},"method":{q(method)},"path":{q(path)},"status":{status},'
        f'"duration_ms":{ms},"bytes_in":{bytes_in},"bytes_out":{out},"client":{q(client)},'
        f'"user_agent":{q(agent)},"request_id":{q(rid)},"trace_id":"{trace}"}}\n'
    )


_quote = json.JSONEncoder(ensure_ascii=False).encode


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
        #: the high half of this process's trace ids, and its request count
        self._prefix = f"{getrandbits(64):016x}"
        self._count = itertools.count(1)

    def begin(self, conn: Connection, request: web.BaseRequest) -> None:
        """Before the handler: the request's trace id and request id, on ``conn`` and in
        ``request["trace_id"]`` and ``request["request_id"]`` for the application."""
        headers = request._message.headers  # request.headers, without a property call
        given = headers.get(_TRACEPARENT_HEADER)
        conn.span = low = f"{(next(self._count) * _SCRAMBLE) & _MASK64:016x}"
        trace = (given and parse_traceparent(given)) or self._prefix + low
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
        headers = response.headers
        headers[_TRACEPARENT_HEADER] = f"00-{conn.trace}-{conn.span}-01"
        headers[_REQUEST_ID_HEADER] = conn.request_id

    def ended(
        self, conn: Connection, request: web.BaseRequest, response: web.StreamResponse
    ) -> None:
        """The response is written: its line, unless it is a probe's or not sampled (a 5xx
        always is)."""
        status = response._status  # response.status, without a property call
        sample = self.sample
        if status < 500 and sample < 1.0 and (sample <= 0.0 or random.random() >= sample):
            return
        message = request._message  # the request line and headers as aiohttp parsed them
        path = message.path
        if not self.probes and (
            path in self.exempt or ("?" in path and path.partition("?")[0] in self.exempt)
        ):
            return
        writer: AccessWriter = self.writer  # type: ignore[assignment]
        pending = writer.pending
        if len(pending) >= writer.limit:
            writer.dropped += 1
            return
        headers = message.headers
        pending.append(
            (
                time.time(),
                message.method,
                path,
                status,
                time.monotonic() - conn.request_began,
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
        wake = writer.wake
        if not wake.is_set():
            wake.set()
