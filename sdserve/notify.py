"""The only writer to systemd: READY, STATUS, STOPPING, RELOADING, EXTEND_TIMEOUT_USEC, WATCHDOG.

Back ends: systemd-python's ``systemd.daemon.notify`` (libsystemd's sd_notify)
where it imports, the pure-Python ``sdnotify`` otherwise. Without
``NOTIFY_SOCKET`` nothing is sent. A message that cannot be sent is logged with
the reason, never swallowed; the service goes on, because systemd then decides
(a start without READY=1 times out, a watchdog without pings restarts it).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Literal

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
        """Send ``KEY=VALUE`` lines as one datagram; False (and a log line) if it failed."""
        if self._send is None:
            return False
        message = "\n".join(assignments)
        try:
            self._send(message)
        except OSError as exc:
            log.error(
                "could not notify systemd at %s (%s): %s",
                self.socket_path,
                message.replace("\n", " "),
                exc,
            )
            return False
        return True

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
