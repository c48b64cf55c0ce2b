"""Moving idle keep-alive connections to the next process instead of closing them.

Closing an idle keep-alive connection races its client: it may be sending its next
request just then, and HTTP/1.1 cannot tell it apart from a request the server
refused. A connection that is *moved* is never closed, so there is no race:

- **reload** (and a worker recycled or replaced): a retiring worker hands each idle
  connection to the supervisor over its :class:`Link`, and the supervisor passes it
  on to a ready worker of the serving generation;
- **restart**: on the SIGTERM of a restart, idle connections go to systemd's fd store
  (``FDSTORE=1`` with an ``FDNAME=`` of :data:`CONN_PREFIX`), and the next instance
  finds them in ``LISTEN_FDS`` beside its listening sockets, takes them out of the
  store at once (``FDSTOREREMOVE=1``) and serves them once it is ready.

A stop cannot be told from a restart by its SIGTERM, and ``systemctl stop`` releases
the store, closing what is in it under clients that may be sending: so idle
connections go to the store only when a restart is known to follow
(:mod:`sdserve.intent`); otherwise the stop drains as before, and a worker retiring
when it comes is told (:data:`DRAIN_HERE`) to drain what it holds too.

Only the file descriptor moves. The kernel keeps the TCP connection as it is, and
bytes the client sends meanwhile wait in its receive buffer, in order, for whoever
reads next; so a connection moves only when the process has read nothing of the
next request (see :func:`sdserve.drain.movable`). The old process then closes its
own copy without ``shutdown()``, which the client never sees.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import logging
import os
import socket
from collections import deque
from collections.abc import Callable, Mapping

log = logging.getLogger("sdserve.handover")

#: FDNAME= of a connection in systemd's fd store (a listening socket never has it)
CONN_PREFIX = "sdserve-conn-"
#: the most fds one SCM_RIGHTS message may carry (the kernel's SCM_MAX_FD)
MAX_FDS_PER_MESSAGE = 253
#: ancillary room for the fds of one message
FD_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * array.array("i").itemsize)
#: the payload of a message on a link: "connections follow"
_CONNECTIONS = b"C"
#: down a link: "this stop is a restart, hand idle connections up for the fd store"
RESTARTING = b"R"
#: down a link: "this stop is no restart: hand nothing more up, drain what you hold" (to
#: a retiring worker; the workers it handed its connections to are stopping too)
DRAIN_HERE = b"D"


def is_connection_name(name: str) -> bool:
    return name.startswith(CONN_PREFIX)


def connection_name(pid: int, seq: int) -> str:
    """A name unique to one stored connection (``FDSTOREREMOVE=1`` removes by name)."""
    return f"{CONN_PREFIX}{pid}-{seq}"


def store_capacity(environ: Mapping[str, str], configured: int) -> int:
    """How many connections systemd's fd store takes from this service; 0: none.

    systemd 254 and later say it in ``$FDSTORE`` (``FileDescriptorStoreMax=``); older
    ones do not, so the unit passes the same number as ``fd_store_max``. Without
    ``NOTIFY_SOCKET`` nobody keeps a store.
    """
    if not environ.get("NOTIFY_SOCKET"):
        return 0
    if configured > 0:
        return configured
    text = environ.get("FDSTORE", "")
    return int(text) if text.isdigit() else 0


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def fds_in(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds of the SCM_RIGHTS parts of a message's ancillary data."""
    fds: list[int] = []
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(cdata[: len(cdata) - len(cdata) % arr.itemsize])
            fds.extend(arr)
    return fds


def recv_fds(sock: socket.socket) -> tuple[bytes, list[int], bool]:
    """One message and the fds it carried; the flag says fds were cut off (MSG_CTRUNC)."""
    data, ancdata, flags, _addr = sock.recvmsg(64, FD_SPACE)
    fds = fds_in(ancdata)
    for fd in fds:
        flags_fd = fcntl.fcntl(fd, fcntl.F_GETFD)
        fcntl.fcntl(fd, fcntl.F_SETFD, flags_fd | fcntl.FD_CLOEXEC)
    return data, fds, bool(flags & socket.MSG_CTRUNC)


class Link:
    """One end of a ``SOCK_SEQPACKET`` socket pair that carries connections (as fds).

    The supervisor keeps one end per worker, the worker the other: a worker sends the
    connections it hands over up, the supervisor sends connections to serve down.
    Sending never blocks: what the socket cannot take now waits, in order, and goes
    out when it is writable. The fds given to :meth:`send` belong to the link from then
    on: closed once sent, or when the link closes (counted in :attr:`lost`).
    """

    def __init__(
        self,
        sock: socket.socket,
        on_connections: Callable[[list[int]], None],
        *,
        on_restarting: Callable[[], None] | None = None,
        on_drain_here: Callable[[], None] | None = None,
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._on_connections = on_connections
        self._on_restarting = on_restarting
        self._on_drain_here = on_drain_here
        import asyncio  # here: the sockets are taken before asyncio is imported

        self._loop = asyncio.get_running_loop()
        #: messages waiting to go out, in order: (payload, fds)
        self._outbox: deque[tuple[bytes, list[int]]] = deque()
        self._writing = False
        self.closed = False
        #: connections lost in this link (not sent before it closed, or a send failed)
        self.lost = 0
        self._loop.add_reader(sock.fileno(), self._on_readable)

    def send(self, fds: list[int]) -> None:
        """Send these connections (in messages of at most MAX_FDS_PER_MESSAGE)."""
        if self.closed:
            self.lost += len(fds)
            close_fds(fds)
            return
        for start in range(0, len(fds), MAX_FDS_PER_MESSAGE):
            self._outbox.append((_CONNECTIONS, fds[start : start + MAX_FDS_PER_MESSAGE]))
        self._flush()

    def _send_batch(self, batch: tuple[bytes, list[int]]) -> None:
        word, fds = batch
        if not fds:
            self.sock.send(word)
            return
        rights = array.array("i", fds)
        self.sock.sendmsg([word], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])

    def _flush(self) -> None:
        while self._outbox:
            batch = self._outbox[0]
            fds = batch[1]
            try:
                self._send_batch(batch)
            except (BlockingIOError, InterruptedError):
                if not self._writing:
                    self._loop.add_writer(self.sock.fileno(), self._flush)
                    self._writing = True
                return
            except OSError as exc:
                log.warning("sending on the link failed (%d connection(s) lost): %s", len(fds), exc)
                self._outbox.popleft()
                self.lost += len(fds)
                close_fds(fds)
                continue
            self._outbox.popleft()
            close_fds(fds)  # the kernel holds them in the message now
        if self._writing:
            self._loop.remove_writer(self.sock.fileno())
            self._writing = False

    def say_restarting(self) -> None:
        """Tell the worker at the other end that the stop coming is a restart."""
        self._say(RESTARTING)

    def say_drain_here(self) -> None:
        """Tell the (retiring) worker at the other end to drain what it holds: the service
        stops, and no restart follows."""
        self._say(DRAIN_HERE)

    def _say(self, word: bytes) -> None:
        """A message without connections, in its turn after those queued before it."""
        if not self.closed:
            self._outbox.append((word, []))
            self._flush()

    def drain(self) -> None:
        """Take every message already queued on the socket, now (its peer has exited)."""
        if not self.closed:
            self._on_readable()

    def _on_readable(self) -> None:
        while not self.closed:
            try:
                data, fds, cut = recv_fds(self.sock)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("reading connections from the link failed: %s", exc)
                self.close()
                return
            if not data and not fds:
                self.close()  # the other end is gone
                return
            if cut:
                log.error("a message of connections was cut off: some were lost")
            if data == RESTARTING and self._on_restarting is not None:
                self._on_restarting()
            elif data == DRAIN_HERE and self._on_drain_here is not None:
                self._on_drain_here()
            if data != _CONNECTIONS:
                close_fds(fds)
                continue
            self._on_connections(fds)

    def close(self) -> None:
        """Stop; close what waits to be sent (counted in :attr:`lost`)."""
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self.sock.fileno())
        if self._writing:
            self._loop.remove_writer(self.sock.fileno())
            self._writing = False
        while self._outbox:
            _word, fds = self._outbox.popleft()
            self.lost += len(fds)
            close_fds(fds)
        self.sock.close()

    def flush_blocking(self, timeout: float) -> None:
        """Before the process exits: send what waits, for at most ``timeout`` seconds."""
        if self.closed or not self._outbox:
            return
        self.sock.settimeout(timeout)
        try:
            while self._outbox:
                batch = self._outbox[0]
                try:
                    self._send_batch(batch)
                except OSError:
                    return
                self._outbox.popleft()
                close_fds(batch[1])
        finally:
            if not self.closed:
                self.sock.setblocking(False)


def link_pair() -> tuple[socket.socket, socket.socket]:
    """The two ends of a new link: (the supervisor's, the worker's)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.set_inheritable(False)
    theirs.set_inheritable(True)
    return ours, theirs
