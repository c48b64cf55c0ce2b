"""The machine's PostgreSQL and Redis, reachable from inside a box (which has only its own lo).

- PostgreSQL listens on a unix socket in ``/var/run/postgresql`` too: that folder is
  bind-mounted read-only into the box (``Box.boot(binds=...)``), and a DSN with
  ``?host=<the folder in the box>`` reaches it.
- Redis listens on 127.0.0.1:6379 only (no ``unixsocket`` configured, and the machine's
  servers are not the tests' to reconfigure). :class:`UnixForwarder` accepts on a unix socket
  in a folder of its own, which is bind-mounted into the box, and connects each client to
  127.0.0.1:6379: every byte goes to the real server and back.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import socketserver
import tempfile
import threading
from pathlib import Path

PG_SOCKET_DIR = Path("/var/run/postgresql")
PG_PORT = 5432
REDIS = ("127.0.0.1", 6379)
#: upper bound of one forwarded connection's silence (a check's connection lives for ms)
IDLE_TIMEOUT = 30.0
CHUNK = 65536


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy ``src`` to ``dst`` until EOF (or an error, or IDLE_TIMEOUT without data), then
    pass the EOF on."""
    with contextlib.suppress(OSError):
        while data := src.recv(CHUNK):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        client: socket.socket = self.request
        client.settimeout(IDLE_TIMEOUT)
        try:
            upstream = socket.create_connection(self.server.target, timeout=IDLE_TIMEOUT)
        except OSError:
            return  # the client sees its connection closed, as with a server that is down
        with upstream:
            back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
            back.start()
            _pump(client, upstream)
            back.join(IDLE_TIMEOUT)


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, target: tuple[str, int]) -> None:
        self.target = target
        super().__init__(path, _Handler)


class UnixForwarder:
    """A unix socket ``<folder>/<name>`` whose connections are relayed to ``target``."""

    def __init__(self, target: tuple[str, int], name: str) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="sds-fwd-"))
        self.folder.chmod(0o755)
        self.path = self.folder / name
        self._server = _Server(str(self.path), target)
        # the box's clients may run as any user (the service's own, under PrivateUsers=)
        os.chmod(self.path, 0o777)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()  # returns once serve_forever has stopped
        self._server.server_close()
        self._thread.join(10)
        shutil.rmtree(self.folder, ignore_errors=True)


def missing() -> list[str]:
    """What of the machine's servers cannot be reached from here."""
    problems = []
    if not (PG_SOCKET_DIR / f".s.PGSQL.{PG_PORT}").exists():
        problems.append(f"no PostgreSQL socket in {PG_SOCKET_DIR}")
    try:
        socket.create_connection(REDIS, timeout=5).close()
    except OSError as exc:
        problems.append(f"no Redis at {REDIS[0]}:{REDIS[1]}: {exc}")
    return problems
