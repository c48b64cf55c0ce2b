"""The only writer to systemd: READY, STATUS, STOPPING, RELOADING, EXTEND_TIMEOUT_USEC, WATCHDOG.

Without ``NOTIFY_SOCKET`` nothing is sent. A message that cannot be sent is logged
with the reason, never swallowed; the service goes on, because systemd then
decides (a start without READY=1 times out, a watchdog without pings restarts it).

**From an event loop, a send never blocks.** The notify socket is a datagram
socket, and a sender blocks when the reader's queue is full: PID 1 busy, or a
supervisor whose loop is itself blocked. A blocked send would stall the loop, and
its watchdog pings, and every request. So within a running loop, messages go out
on a non-blocking socket of the notifier's own, connected once; when the reader's
queue is full they wait in an outbox, sent in order once the socket is writable
again. Waiting ``WATCHDOG=1`` pings are coalesced into one, and a ``STATUS=``-only
message replaces the waiting one; every other message (``READY=1``,
``STOPPING=1``, ``RELOADING=1``...) is kept, in order. :meth:`Notifier.flush`
gives the outbox a bounded last chance before the process exits.

Outside a running loop (a start that fails before it), the back ends send, and may
block: systemd-python's ``systemd.daemon.notify`` (libsystemd's sd_notify) where it
imports, the pure-Python ``sdnotify`` otherwise.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import select
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import asyncio

from .handover import close_fds

log = logging.getLogger("sdserve.notify")

Backend = Literal["auto", "systemd", "sdnotify"]


def _systemd_sender() -> Callable[[str], None] | None:
    try:
        from systemd import daemon
    except ImportError:
        return None

    def send(message: str) -> None:
        if not daemon.notify(message):
            raise OSError("sd_notify() reported that the message was not sent")

    return send


def _sdnotify_sender() -> Callable[[str], None] | None:
    try:
        import sdnotify
    except ImportError:
        return None

    class _Once(sdnotify.SystemdNotifier):
        """sdnotify's sender, connected per message; its own constructor leaks the
        socket when the connect fails, so this one closes it."""

        def __init__(self, address: str) -> None:
            self.debug = True  # raise instead of swallowing
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                sock.connect("\0" + address[1:] if address.startswith("@") else address)
            except BaseException:
                sock.close()
                raise
            self.socket = sock

    def send(message: str) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        once = _Once(address)
        try:
            once.notify(message)
        finally:
            once.socket.close()

    return send


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as systemd wants it in MONOTONIC_USEC=."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends sd_notify(3) messages; every method is a no-op without ``NOTIFY_SOCKET``.

    ``environ`` is read once, at construction (both back ends read the process
    environment when they send, so ``NOTIFY_SOCKET`` must stay set there).
    """

    def __init__(self, environ: Mapping[str, str] | None = None, backend: Backend = "auto") -> None:
        env = os.environ if environ is None else environ
        self.socket_path = env.get("NOTIFY_SOCKET") or None
        self.backend_name = "none"
        self._send: Callable[[str], None] | None = None
        self._watchdog_usec = _watchdog_usec(env)
        #: the non-blocking socket used within an event loop, and what waits for it
        self._sock: socket.socket | None = None
        self._outbox: deque[tuple[str, list[int]]] = deque()
        self._writing: asyncio.AbstractEventLoop | None = None
        #: messages given up (a coalesced ping or status, or a send that failed)
        self.dropped = 0
        #: the latest STATUS= said (even without a notify socket): for `sdserve status`
        self.last_status = ""
        if self.socket_path is None:
            return
        candidates: list[tuple[str, Callable[[], Callable[[str], None] | None]]] = []
        if backend in ("auto", "systemd"):
            candidates.append(("systemd-python", _systemd_sender))
        if backend in ("auto", "sdnotify"):
            candidates.append(("sdnotify", _sdnotify_sender))
        for name, make in candidates:
            sender = make()
            if sender is not None:
                self._send, self.backend_name = sender, name
                break
        else:
            log.error("NOTIFY_SOCKET is set but neither systemd-python nor sdnotify imports")

    @property
    def enabled(self) -> bool:
        return self._send is not None

    @property
    def watchdog_interval(self) -> float | None:
        """How often to send WATCHDOG=1 (half of WATCHDOG_USEC), or None when not asked."""
        return None if self._watchdog_usec is None else self._watchdog_usec / 2e6

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; False (and a log line) if it failed.

        Within a running event loop this never blocks: a message the socket cannot take
        now waits in the outbox (True: it will be sent).
        """
        for line in assignments:
            if line.startswith("STATUS="):
                self.last_status = line[len("STATUS=") :]
        if self._send is None:
            return False
        message = "\n".join(assignments)
        try:
            import asyncio  # imported late: sdserve answers probes before it

            loop = asyncio.get_running_loop()
        except RuntimeError:
            return self._send_blocking(message)
        return self._send_from(loop, message, [])

    def store_fds(self, name: str, fds: list[int]) -> bool:
        """``FDSTORE=1`` with ``FDNAME=name``: these fds go to systemd's fd store.

        The fds belong to the notifier from then on: closed once sent (systemd holds its
        own copies), or when they are given up (counted in :attr:`dropped`). Only from a
        running event loop; False, and the fds closed, otherwise.
        """
        try:
            import asyncio  # imported late: sdserve answers probes before it

            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if self._send is None or loop is None:
            close_fds(fds)
            return False
        return self._send_from(loop, f"FDSTORE=1\nFDNAME={name}", fds)

    def remove_stored(self, name: str) -> bool:
        """``FDSTOREREMOVE=1``: systemd closes its copies of the fds stored as ``name``."""
        return self.send("FDSTOREREMOVE=1", f"FDNAME={name}")

    def _send_blocking(self, message: str) -> bool:
        assert self._send is not None
        try:
            self._send(message)
        except OSError as exc:
            self._failed(message, exc)
            return False
        return True

    def _failed(self, message: str, exc: OSError) -> None:
        self.dropped += 1
        log.error(
            "could not notify systemd at %s (%s): %s",
            self.socket_path,
            message.replace("\n", " "),
            exc,
        )

    # -- within a loop: never blocking -------------------------------------------------

    def _socket(self) -> socket.socket:
        if self._sock is None:
            assert self.socket_path is not None
            address = self.socket_path
            if address.startswith("@"):
                address = "\0" + address[1:]
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            try:
                sock.connect(address)
            except OSError:
                sock.close()
                raise
            self._sock = sock
        return self._sock

    def _reset(self) -> None:
        if self._writing is not None and self._sock is not None:
            self._writing.remove_writer(self._sock.fileno())
            self._writing = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send_from(self, loop: asyncio.AbstractEventLoop, message: str, fds: list[int]) -> bool:
        if self._outbox:  # keep the order: behind what waits
            self._enqueue(message, fds)
            return True
        for attempt in (1, 2):
            try:
                _send_one(self._socket(), message, fds)
                close_fds(fds)
                return True
            except BlockingIOError:
                self._enqueue(message, fds)
                self._wait_writable(loop)
                return True
            except OSError as exc:
                # the reader went away and may be back under the same name (a systemd
                # re-exec): connect again, once
                self._reset()
                if attempt == 2 or exc.errno not in _RECONNECT:
                    self._failed(message, exc)
                    close_fds(fds)
                    return False
        return False  # pragma: no cover - the loop always returns

    def _enqueue(self, message: str, fds: list[int]) -> None:
        if message == "WATCHDOG=1" or _status_only(message):
            # a newer ping, or a newer status, replaces the one that waits
            same = [
                item
                for item in self._outbox
                if item[0] == message or (_status_only(message) and _status_only(item[0]))
            ]
            for old in same:
                self._outbox.remove(old)
                self.dropped += 1
        self._outbox.append((message, fds))

    def _wait_writable(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._writing is None and self._sock is not None:
            loop.add_writer(self._sock.fileno(), self._flush_ready)
            self._writing = loop

    def _flush_ready(self) -> None:
        """The socket can take datagrams again: send what waits, in order."""
        while self._outbox:
            message, fds = self._outbox[0]
            try:
                _send_one(self._socket(), message, fds)
            except BlockingIOError:
                return  # still full: wait for the next writable event
            except OSError as exc:
                self._outbox.popleft()
                self._failed(message, exc)
                close_fds(fds)
                continue
            self._outbox.popleft()
            close_fds(fds)
        if self._writing is not None and self._sock is not None:
            self._writing.remove_writer(self._sock.fileno())
            self._writing = None

    @property
    def pending(self) -> int:
        """Messages waiting for the notify socket's reader."""
        return len(self._outbox)

    def flush(self, timeout: float) -> None:
        """Before the process exits: send what waits, waiting for the socket at most
        ``timeout`` seconds in all; what is left then is logged as lost."""
        deadline = time.monotonic() + timeout
        while self._outbox and self._sock is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            _, writable, _ = select.select([], [self._sock], [], left)
            if writable:
                self._flush_ready()
        if self._outbox:
            lost = " | ".join(m.replace("\n", " ") for m, _ in self._outbox)
            log.error("notify socket %s not read: lost %s", self.socket_path, lost)
            self.dropped += len(self._outbox)
            for _, fds in self._outbox:
                close_fds(fds)
            self._outbox.clear()
        self._reset()

    def ready(self, status: str | None = None) -> bool:
        lines = ["READY=1"]
        if status is not None:
            lines.append(f"STATUS={status}")
        return self.send(*lines)

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def stopping(self, status: str | None = None) -> bool:
        lines = ["STOPPING=1"]
        if status is not None:
            lines.append(f"STATUS={status}")
        return self.send(*lines)

    def reloading(self, status: str | None = None) -> bool:
        lines = ["RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}"]
        if status is not None:
            lines.append(f"STATUS={status}")
        return self.send(*lines)

    def extend_timeout(self, seconds: float) -> bool:
        return self.send(f"EXTEND_TIMEOUT_USEC={max(1, int(seconds * 1e6))}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def main_pid(self, pid: int) -> bool:
        return self.send(f"MAINPID={pid}")


_RECONNECT = {errno.ECONNREFUSED, errno.ENOTCONN, errno.EPIPE, errno.ENOENT}


def _send_one(sock: socket.socket, message: str, fds: list[int]) -> None:
    if fds:
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        sock.sendmsg([message.encode()], rights)
    else:
        sock.send(message.encode())


def _status_only(message: str) -> bool:
    return message.startswith("STATUS=") and "\n" not in message


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    text = env.get("WATCHDOG_USEC")
    if not text:
        return None
    wd_pid = env.get("WATCHDOG_PID")
    if wd_pid and wd_pid != str(os.getpid()):
        return None
    try:
        usec = int(text)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not a number", text)
        return None
    return usec if usec > 0 else None
