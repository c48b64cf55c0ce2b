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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio

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
#: up a link: "I serve no more: send me nothing" (a worker whose drain is over)
LEAVING = b"L"
#: down a link, the answer to LEAVING: "nothing more comes after this"
BYE = b"B"
#: up a link: connections sent down that the worker could not serve any more, given back
_RETURNED = b"U"


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
    on: closed once sent; if they cannot be sent (the link closed, or its peer is gone)
    they go to ``on_undelivered``, or are closed and counted in :attr:`lost`.

    A worker ends its side with :meth:`leave`: it says LEAVING, gives back
    (:meth:`give_back`) what still comes down, and closes only on the answer, BYE,
    after which the supervisor sends nothing; so no connection is ever left in a
    socket buffer that is about to close.
    """

    def __init__(
        self,
        sock: socket.socket,
        on_connections: Callable[[list[int]], None],
        *,
        on_restarting: Callable[[], None] | None = None,
        on_drain_here: Callable[[], None] | None = None,
        on_returned: Callable[[list[int]], None] | None = None,
        on_undelivered: Callable[[list[int]], None] | None = None,
    ) -> None:
        import asyncio  # here: the sockets are taken before asyncio is imported

        sock.setblocking(False)
        self.sock = sock
        self._on_connections = on_connections
        self._on_restarting = on_restarting
        self._on_drain_here = on_drain_here
        self._on_returned = on_returned
        self._on_undelivered = on_undelivered
        self._loop = asyncio.get_running_loop()
        #: messages waiting to go out, in order: (payload, fds)
        self._outbox: deque[tuple[bytes, list[int]]] = deque()
        self._writing = False
        self.closed = False
        #: the peer said LEAVING: it serves nothing more sent to it
        self.peer_leaving = False
        #: BYE came (or the link closed) after this end said LEAVING
        self._bye: asyncio.Future[None] = self._loop.create_future()
        self._left = False
        #: a send failed: the peer is gone, nothing more is sent
        self._broken = False
        #: connections lost in this link (not sent before it closed, or a send failed)
        self.lost = 0
        self._loop.add_reader(sock.fileno(), self._on_readable)

    @property
    def open_to_serve(self) -> bool:
        """Connections sent now would be served at the other end."""
        return not (self.closed or self._broken or self.peer_leaving)

    def send(self, fds: list[int]) -> None:
        """Send these connections (in messages of at most MAX_FDS_PER_MESSAGE)."""
        self._queue(_CONNECTIONS, fds)

    def give_back(self, fds: list[int]) -> None:
        """Send connections that came down, unserved, back up (this end is leaving)."""
        self._queue(_RETURNED, fds)

    def _queue(self, word: bytes, fds: list[int]) -> None:
        if self.closed or self._broken:
            self._undelivered(fds)
            return
        for start in range(0, len(fds), MAX_FDS_PER_MESSAGE):
            self._outbox.append((word, fds[start : start + MAX_FDS_PER_MESSAGE]))
        self._flush()

    def _undelivered(self, fds: list[int]) -> None:
        if not fds:
            return
        if self._on_undelivered is not None:
            self._on_undelivered(fds)
            return
        self.lost += len(fds)
        close_fds(fds)

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
                # the peer is gone: nothing more goes this way, but what it sent before it
                # went is still to be read (until the end of the stream closes the link)
                log.info("the link's other end is gone (%s): nothing more is sent on it", exc)
                self._broken = True
                self._stop_writing()
                self._undelivered(self._take_unsent())
                return
            self._outbox.popleft()
            close_fds(fds)  # the kernel holds them in the message now
        self._stop_writing()

    def _stop_writing(self) -> None:
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
        if not self.closed and not self._broken:
            self._outbox.append((word, []))
            self._flush()

    def say_leaving(self) -> None:
        """Tell the supervisor to send nothing more (once)."""
        if not self._left:
            self._left = True
            self._say(LEAVING)

    async def leave(self, timeout: float) -> None:
        """Say LEAVING and wait (at most ``timeout`` seconds) for BYE, giving back what
        comes down meanwhile; the caller has stopped serving."""
        import asyncio

        self.say_leaving()
        if self.closed:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._bye), timeout)

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
            elif data == LEAVING:
                self.peer_leaving = True
                self._say(BYE)  # after what is queued: the peer gives that back
            elif data == BYE and not self._bye.done():
                self._bye.set_result(None)
            if data == _RETURNED and self._on_returned is not None:
                self._on_returned(fds)
            elif data in (_CONNECTIONS, _RETURNED):
                self._on_connections(fds)
            else:
                close_fds(fds)

    def close(self) -> None:
        """Stop; what waits to be sent goes to ``on_undelivered`` (or is lost)."""
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self.sock.fileno())
        self._stop_writing()
        if not self._bye.done():
            self._bye.set_result(None)
        self.sock.close()
        self._undelivered(self._take_unsent())

    def _take_unsent(self) -> list[int]:
        unsent = [fd for _word, fds in self._outbox for fd in fds]
        self._outbox.clear()
        return unsent

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
