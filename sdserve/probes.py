"""The admin socket's health probes while nothing else can answer them.

The admin socket is the operator's window, so it answers from the first moment:
``/livez`` 200 (the process is alive and starting), ``/readyz`` and ``/startupz`` 503
naming what the start waits for ("waiting for db (ConnectionRefusedError ...)"),
with the usual formats (``?verbose``, ``?exclude=``, ``?format=json``; see
:mod:`sdserve.health`). The main socket is not touched: its connections wait in the
kernel queue until the application is ready.

Who answers when:

- **Single process:** this responder from the moment the sockets are taken (before
  aiohttp or the application is imported, which takes a few hundred milliseconds
  and blocks the event loop) until the application's start-up hooks have run; then
  the admin application served by aiohttp takes over, and shows every check's
  result as the start-up gate records it.
- **With workers:** the supervisor's responder whenever no worker is ready: during
  the start, and when every worker died and is being replaced. Once a worker is
  ready, the workers answer (a worker serves the admin socket only once it is
  ready, so during a reload the warming generation never answers "not ready"
  beside the one that serves).

It is a thread with a selector of its own, because the importing and the
application's own start-up code block the main thread. It reads one string (what
the start waits for) that its owner replaces; it answers each request and closes
the connection. Bounded: at most :data:`MAX_CONNECTIONS` at once (the rest wait in
the kernel queue), a request head of at most :data:`MAX_HEAD` bytes that must arrive
within :data:`HEAD_TIMEOUT` seconds.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import selectors
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from http import HTTPStatus
from typing import Protocol

from .activation import Listener
from .config import HealthConfig
from .healthreport import Entry, ProbeQuery, Status, respond

MAX_CONNECTIONS = 64
MAX_HEAD = 8192
HEAD_TIMEOUT = 5.0

_LISTENER = "listener"
#: the name of the admin socket (``FileDescriptorName=admin``)
ADMIN_SOCKET = "admin"


class StartupProbes:
    """Answers the health probes on ``socks`` (listening sockets) from a thread.

    :meth:`pause` stops accepting (connections already accepted are answered),
    :meth:`resume` accepts again, :meth:`stop` ends the thread. ``status`` is what
    the start waits for, replaced by the owner whenever it changes.
    """

    def __init__(self, socks: Sequence[socket.socket], config: HealthConfig) -> None:
        self.socks = list(socks)
        self.config = config
        self.status = "importing the server and the application"
        #: the checks' latest results, if known (replaced whole by the owner)
        self.checks: list[Entry] = []
        self.answered = 0
        self._commands: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="sdserve-probes", daemon=True)
        self._accepting = False
        self._stopped = False

    def start(self) -> None:
        for sock in self.socks:
            sock.setblocking(False)
        self._accepting = True
        self._thread.start()

    def pause(self) -> None:
        self._command("pause")

    def resume(self) -> None:
        self._command("resume")

    def stop(self) -> None:
        """End the thread and wait for it (a fraction of a millisecond)."""
        if self._stopped:
            return
        self._stopped = True
        self._command("stop")
        if self._thread.is_alive():
            self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _command(self, what: str) -> None:
        if self._stopped and what != "stop":
            return
        self._commands.put(what)
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    # -- what is answered -----------------------------------------------------------------

    def entries(self, path: str) -> tuple[str, list[Entry]] | None:
        cfg = self.config
        waiting = self.status
        if path == cfg.livez_path:
            alive = f"alive, starting: {waiting}"
            return "livez", [
                Entry("loop", "pass", alive, "system"),
                Entry("monitor", "pass", "not started yet", "system"),
            ]
        if path == cfg.readyz_path:
            return "readyz", [
                Entry("phase", "fail", f"starting: {waiting}", "system", measurement="state"),
                *self.checks,
            ]
        if path == cfg.startupz_path:
            return "startupz", [Entry("started", "fail", waiting, "system", measurement="state")]
        return None

    def answer(self, head: bytes) -> bytes:
        """The whole HTTP response to one request head."""
        try:
            request_line, _, rest = head.partition(b"\r\n")
            method, target, _version = request_line.decode("ascii").split(" ")
        except (UnicodeDecodeError, ValueError):
            return _response(400, "text/plain", "bad request\n")
        accept = ""
        for line in rest.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"accept":
                accept = value.strip().decode("latin-1")
        url = urllib.parse.urlsplit(target)
        found = self.entries(url.path)
        if found is None:
            return _response(404, "text/plain", "not found (sdserve is starting)\n")
        if method not in ("GET", "HEAD"):
            return _response(405, "text/plain", "method not allowed\n", allow="GET, HEAD")
        query = ProbeQuery.from_mapping(
            urllib.parse.parse_qs(url.query, keep_blank_values=True), accept
        )
        endpoint, entries = found
        code, body, ctype = respond(endpoint, entries, query, details=True)
        return _response(code, ctype, body, head_only=method == "HEAD")

    # -- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        conns: dict[socket.socket, tuple[bytearray, float]] = {}
        listening = False

        def listen(on: bool) -> None:
            nonlocal listening
            if on and not listening:
                for sock in self.socks:
                    sel.register(sock, selectors.EVENT_READ, _LISTENER)
            elif not on and listening:
                for sock in self.socks:
                    sel.unregister(sock)
            listening = on

        def drop(conn: socket.socket) -> None:
            sel.unregister(conn)
            del conns[conn]
            conn.close()

        listen(True)
        try:
            while True:
                timeout = None
                if conns:
                    timeout = max(0.0, min(d for _, d in conns.values()) - time.monotonic())
                for key, _ in sel.select(timeout):
                    if key.data is None:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 512)
                        while not self._commands.empty():
                            what = self._commands.get()
                            if what == "stop":
                                return
                            self._accepting = what == "resume"
                    elif key.data == _LISTENER:
                        self._accept(key.fileobj, sel, conns)  # type: ignore[arg-type]
                    else:
                        conn: socket.socket = key.fileobj  # type: ignore[assignment]
                        if self._read(conn, conns[conn][0]):
                            drop(conn)
                now = time.monotonic()
                for conn in [c for c, (_, d) in conns.items() if d <= now]:
                    drop(conn)  # a request head that did not arrive in time
                listen(self._accepting and len(conns) < MAX_CONNECTIONS)
        finally:
            for conn in list(conns):
                drop(conn)
            sel.close()

    def _accept(
        self,
        listener: socket.socket,
        sel: selectors.BaseSelector,
        conns: dict[socket.socket, tuple[bytearray, float]],
    ) -> None:
        while len(conns) < MAX_CONNECTIONS:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return  # none left (or another process took it)
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                return  # EMFILE and the like: the kernel keeps it queued
            conn.setblocking(False)
            conns[conn] = (bytearray(), time.monotonic() + HEAD_TIMEOUT)
            sel.register(conn, selectors.EVENT_READ, "conn")

    def _read(self, conn: socket.socket, buf: bytearray) -> bool:
        """Read what arrived; True when the connection is done with."""
        try:
            data = conn.recv(MAX_HEAD)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True
        if not data:
            return True
        buf += data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) < MAX_HEAD:
                return False
            reply = _response(431, "text/plain", "request head too large\n")
        else:
            reply = self.answer(bytes(buf[:end]))
        with contextlib.suppress(OSError):
            conn.send(reply)  # a few hundred bytes: the socket buffer takes them whole
        self.answered += 1
        return True


def _response(
    code: int, ctype: str, body: str, *, head_only: bool = False, allow: str = ""
) -> bytes:
    data = body.encode()
    lines = [
        f"HTTP/1.1 {code} {HTTPStatus(code).phrase}",
        f"Content-Type: {ctype}; charset=utf-8",
        f"Content-Length: {len(data)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    if allow:
        lines.append(f"Allow: {allow}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head_only else data)


#: the notify field in which a supervised worker sends each round of its start-up checks
START_CHECKS = "X_SDSERVE_START_CHECKS"


class _Result(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def ok(self) -> bool: ...
    @property
    def output(self) -> str: ...
    @property
    def duration(self) -> float: ...
    @property
    def finished_at(self) -> float: ...
    @property
    def critical(self) -> bool: ...


def start_checks_to_json(results: Iterable[_Result]) -> str:
    """One round of start-up check results (:class:`sdserve.checks.CheckResult`), as JSON."""
    return json.dumps(
        [
            [r.name, r.ok, r.output[:500], round(r.duration * 1000, 3), r.finished_at, r.critical]
            for r in results
        ],
        separators=(",", ":"),
    )


def start_check_entries(reports: Mapping[int, str]) -> list[Entry]:
    """Readiness entries from the workers' latest rounds (worker id -> JSON): per check,
    the worst result among the workers, and which worker saw it."""
    worst: dict[str, tuple[int, Entry]] = {}
    rank = {"pass": 0, "warn": 1, "fail": 2}
    for worker, text in sorted(reports.items()):
        try:
            rows = json.loads(text)
            for name, ok, output, took, at, critical in rows:
                status: Status = "pass" if ok else ("fail" if critical else "warn")
                said = output if ok else f"{output or 'failed'} (worker {worker}"
                if not ok:
                    said += ", the start waits for it)" if critical else ", optional)"
                entry = Entry(str(name), status, said, "component", float(took), time=float(at))
                if name not in worst or rank[status] > rank[worst[name][1].status]:
                    worst[name] = (worker, entry)
        except (ValueError, TypeError):
            continue  # an unreadable report: the phase entry still says what is awaited
    return [entry for _, entry in worst.values()]


def start_probes(listeners: Sequence[Listener], config: HealthConfig) -> StartupProbes | None:
    """A running responder on the admin listeners, or None when there is nothing to
    answer on (no admin socket, or health endpoints not on it)."""
    if not config.enabled or config.placement not in ("both", "admin"):
        return None
    socks = [ls.sock for ls in listeners if ls.name == ADMIN_SOCKET]
    if not socks:
        return None
    probes = StartupProbes(socks, config)
    probes.start()
    return probes
