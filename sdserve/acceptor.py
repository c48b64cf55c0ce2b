"""Accepting connections from a listening socket, with an exact count of those in flight.

asyncio's own server hands an accepted socket to a task before the protocol
exists, so a drain that starts in between cannot see that connection. This
acceptor counts every accepted socket until its protocol is connected, which lets
the drain wait for it, and it sets TCP_NODELAY on every accepted TCP connection
whatever the listening socket was (inherited or bound here).

Stopping only stops accepting: the listening socket stays open, so with systemd
(or the supervisor) holding it too, new connections wait in the kernel's queue
for the next process.

At ``max_connections`` (open plus being connected) the acceptor stops reading the
socket until one closes: the kernel's queue holds the rest, and another worker
sharing the socket takes them. A client that waits there while this process holds
keep-alive connections idle between requests is not left waiting for their keep-alive
timeout: the longest idle of them (idle for ``reclaim_after`` or more) are closed to
make room (:meth:`sdserve.drain.Tracker.reclaim_idle`), as nginx does when it runs out
of connections. Otherwise a pool of idle connections, a client library's or an
attacker's, would shut new clients out.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable

from .activation import Listener
from .drain import Tracker, set_nodelay
from .log import NOTE_INTERVAL

log = logging.getLogger("sdserve.acceptor")

#: accepts per wake-up; small, so that worker processes sharing a socket share the load
ACCEPT_BATCH = 16
#: pause after running out of file descriptors or memory, before accepting again
RESOURCE_PAUSE = 0.5
_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
#: at max_connections, a keep-alive connection idle this long (or a quarter of the
#: keep-alive timeout, if less) may be closed for a client waiting in the kernel's queue:
#: long enough that a client busy on it is not cut between two requests
RECLAIM_AFTER = 1.0


def reclaim_after(keepalive_timeout: float) -> float:
    """How long a keep-alive connection must have been idle to be closed at
    max_connections (0: keep-alive is off, so none is ever idle)."""
    return min(RECLAIM_AFTER, keepalive_timeout / 4) if keepalive_timeout > 0 else 0.0


class Acceptor:
    def __init__(
        self,
        listener: Listener,
        protocol_factory: Callable[[], asyncio.Protocol],
        tracker: Tracker,
        max_connections: int = 0,
        reclaim_after: float = 0.0,
    ) -> None:
        self.listener = listener
        self._factory = protocol_factory
        self._tracker = tracker
        self._max = max_connections
        #: at max_connections, close keep-alive connections idle this long (0: never)
        self._reclaim_after = reclaim_after
        #: full, nothing idle long enough yet: when to look again
        self._recheck: asyncio.TimerHandle | None = None
        #: times it was full since the last warning, and when it may warn again
        self._full_times = 0
        self._next_note = 0.0
        self._loop = asyncio.get_running_loop()
        self._accepting = False
        #: reading the socket (not when stopped, paused after an error, or full)
        self._reading = False
        self._resume: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.accepted = 0
        tracker.on_closed.append(self._room)

    def start(self) -> None:
        if self._accepting:
            return
        self.listener.sock.setblocking(False)
        self._accepting = True
        self._read(True)

    def stop(self) -> None:
        """Stop accepting; connections already accepted are still served."""
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        self._cancel_recheck()
        self._accepting = False
        self._read(False)

    def _read(self, on: bool) -> None:
        if on and not self._reading:
            self._loop.add_reader(self.listener.fd, self._on_readable)
        elif not on and self._reading:
            self._loop.remove_reader(self.listener.fd)
        self._reading = on

    def _full(self) -> bool:
        held = len(self._tracker.connections) + self._tracker.pending_accepts
        return bool(self._max) and held >= self._max

    def _room(self) -> None:
        """A connection closed: accept again if it was full."""
        if self._accepting and not self._reading and self._resume is None and not self._full():
            self._cancel_recheck()
            self._read(True)

    def _make_room(self) -> None:
        """Full, with a client waiting in the kernel's queue: close keep-alive connections
        idle long enough for it (as they close, :meth:`_room` accepts again). With none,
        the client waits for a connection to close, and this looks again when the next
        idle one is due."""
        if self._reclaim_after > 0:
            closed, again = self._tracker.reclaim_idle(ACCEPT_BATCH, self._reclaim_after)
            if closed:
                return
            if self._recheck is None:
                self._recheck = self._loop.call_at(again, self._look_again)
        self._tracker.rejected["connection_limit"] += 1
        self._full_times += 1
        now = self._loop.time()
        if now < self._next_note:
            return  # said at most every NOTE_INTERVAL: a crowd would flood the journal
        self._next_note = now + NOTE_INTERVAL
        idle = f", none idle for {self._reclaim_after:g}s" if self._reclaim_after else ""
        log.warning(
            "%d connections open on %s (max_connections)%s: not accepting until one "
            "closes; the kernel's queue holds the rest (%d time(s) since the last note)",
            self._max,
            self.listener.address,
            idle,
            self._full_times,
            extra={"SDSERVE_PHASE": "limit", "SDSERVE_LIMIT": "max_connections"},
        )
        self._full_times = 0

    def _look_again(self) -> None:
        """Read the socket again: a client still waiting makes :meth:`_on_readable` look
        for idle connections once more."""
        self._recheck = None
        if self._accepting and self._resume is None:
            self._read(True)

    def _cancel_recheck(self) -> None:
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None

    def _pause(self) -> None:
        self._read(False)
        self._resume = self._loop.call_later(RESOURCE_PAUSE, self._unpause)

    def _unpause(self) -> None:
        self._resume = None
        if self._accepting and not self._full():
            self._read(True)

    def _on_readable(self) -> None:
        for n in range(ACCEPT_BATCH):
            if self._full():
                if n:
                    # full after accepting: a client still waiting makes the socket
                    # readable again, and the next call makes room for it
                    return
                self._read(False)
                self._make_room()
                return
            try:
                conn, _addr = self.listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:
                    log.error(
                        "cannot accept on %s (%s): pausing for %.1fs",
                        self.listener.address,
                        exc.strerror,
                        RESOURCE_PAUSE,
                    )
                    self._pause()
                    return
                raise
            self.accepted += 1
            # for a moment a new connection is counted twice (open, and still pending):
            # an acceptor that paused then looks again
            serve_connection(conn, self._factory, self._tracker, self._tasks, then=self._room)


def serve_connection(
    conn: socket.socket,
    factory: Callable[[], asyncio.Protocol],
    tracker: Tracker,
    tasks: set[asyncio.Task[None]],
    *,
    then: Callable[[], None] | None = None,
) -> None:
    """Serve ``conn`` (accepted, or handed over by another process) with a new protocol,
    counted in ``tracker.pending_accepts`` until it is connected, so that a drain that
    starts meanwhile waits for it. Its task is kept in ``tasks`` while it runs."""
    tracker.pending_accepts += 1
    task = asyncio.get_running_loop().create_task(_connect(conn, factory, tracker, then))
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def _connect(
    conn: socket.socket,
    factory: Callable[[], asyncio.Protocol],
    tracker: Tracker,
    then: Callable[[], None] | None,
) -> None:
    try:
        conn.setblocking(False)
        set_nodelay(conn)
        await asyncio.get_running_loop().connect_accepted_socket(factory, conn)
    except OSError as exc:
        log.debug("a connection was gone before it was served: %s", exc)
        conn.close()
    finally:
        tracker.pending_accepts -= 1
        tracker.changed()
        if then is not None:
            then()
