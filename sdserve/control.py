"""The control socket, and ``sdserve reload``: a reload that reports its outcome.

``systemctl reload`` runs ``ExecReload=sdserve reload $MAINPID``. The command
connects to the service's control socket, asks for a reload and waits for its
outcome, so that ``systemctl reload`` fails when the reload failed (a bad release,
a broken config, a service that cannot reload), on every systemd version. A
plain SIGHUP still reloads, but nothing can tell its sender how it went.

The socket is ``@sdserve/PID/PIDNS/control`` in the abstract namespace (it vanishes with
the process, and needs no writable directory in a hardened unit); PIDNS is the inode of the
PID namespace, so that services in containers sharing a network namespace do not collide.
Both ends check each other with ``SO_PEERCRED``: the service answers only root and its own
user, and the command talks only to the process whose PID it was given.

The protocol, one line each way: the client sends ``reload``; the service sends
``progress TEXT`` lines while it works, then one verdict, ``ok TEXT``,
``failed TEXT`` or ``refused TEXT``, and closes. Or the client sends ``status`` and
the service answers ``status JSON`` (its phase, generation, workers and sockets: what
``sdserve status`` shows) and closes. A reload asked while another is
running waits for the next one (it may carry newer code), and requests that
arrive meanwhile share that next one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("sdserve.control")

_UCRED = struct.Struct("3i")
#: bytes of a request line that the service reads at most
MAX_REQUEST = 256


def pid_namespace() -> str:
    """The inode of this process's PID namespace, or "" where /proc cannot tell."""
    try:
        link = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return ""
    return link.removeprefix("pid:[").removesuffix("]")


def control_address(pid: int, namespace: str | None = None) -> str:
    """The control socket of the sdserve process ``pid`` (abstract: a leading NUL).

    Abstract names belong to the network namespace, and PIDs to the PID namespace: two
    containers that share a network but not their PIDs (systemd boxes, pods) may each run
    sdserve as the same PID. So the name carries the PID namespace (``namespace``: the
    caller's, by default), in which both ends must be for the PID to mean the same process.
    """
    ns = pid_namespace() if namespace is None else namespace
    return f"\0sdserve/{pid}/{ns}/control" if ns else legacy_control_address(pid)


def legacy_control_address(pid: int) -> str:
    """The name before the PID namespace was in it: a service started by an older sdserve
    (before an upgrade restarts it) still listens there."""
    return f"\0sdserve/{pid}/control"


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the other end of a connected unix socket."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(data)
    return pid, uid, gid


@dataclass(eq=False)
class ReloadWaiter:
    """One ``sdserve reload`` client waiting for the outcome of a reload."""

    id: int
    writer: asyncio.StreamWriter
    done: asyncio.Event = field(default_factory=asyncio.Event)
    #: ``reload canary=N watch=SECONDS``: a canary for this reload (None: the config's)
    canary: int | None = None
    watch: float | None = None

    def _line(self, text: str) -> None:
        if self.writer.is_closing():
            return
        self.writer.write((text.replace("\n", " ") + "\n").encode())

    def progress(self, text: str) -> None:
        self._line(f"progress {text}")

    def finish(self, verdict: str, text: str) -> None:
        """``verdict`` is ok, failed or refused."""
        self._line(f"{verdict} {text}")
        self.done.set()


class ControlServer:
    """Accepts ``reload`` requests; ``on_reload`` gets each one as a :class:`ReloadWaiter`."""

    def __init__(
        self,
        on_reload: Callable[[ReloadWaiter], None],
        on_status: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self._on_reload = on_reload
        self._on_status = on_status
        self._server: asyncio.Server | None = None
        self._next = 1
        self.waiters: dict[int, ReloadWaiter] = {}

    async def start(self) -> None:
        address = control_address(os.getpid())
        try:
            self._server = await asyncio.start_unix_server(self._client, path=address)
        except OSError as exc:
            # the service still runs; `sdserve reload` will say it cannot reach it
            log.error(
                "cannot open the control socket @%s (%s): `sdserve reload` will not work",
                address[1:],
                exc.strerror or exc,
                extra={"SDSERVE_PHASE": "control"},
            )

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        waiter: ReloadWaiter | None = None
        try:
            sock = writer.get_extra_info("socket")
            _pid, uid, _gid = peer_credentials(sock)
            if uid not in (0, os.getuid()):
                writer.write(f"refused uid {uid} may not control this service\n".encode())
                return
            async with asyncio.timeout(10):
                line = await reader.readline()
            request = line[:MAX_REQUEST].decode(errors="replace").strip()
            if request == "status" and self._on_status is not None:
                report = json.dumps(self._on_status(), separators=(",", ":"))
                writer.write(f"status {report}\n".encode())
                await writer.drain()
                return
            verb, *options = request.split()
            if verb != "reload":
                writer.write(
                    f"refused unknown request {request!r} (expected: reload, status)\n".encode()
                )
                return
            try:
                canary, watch = parse_reload_options(options)
            except ValueError as exc:
                writer.write(f"refused {exc}\n".encode())
                return
            waiter = ReloadWaiter(self._next, writer, canary=canary, watch=watch)
            self._next += 1
            self.waiters[waiter.id] = waiter
            self._on_reload(waiter)
            # the verdict comes from the lifecycle; a client that goes away just stops waiting
            gone = asyncio.ensure_future(reader.read())
            finished = asyncio.ensure_future(waiter.done.wait())
            try:
                await asyncio.wait({gone, finished}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
                finished.cancel()
            await writer.drain()
        except (OSError, TimeoutError):
            pass  # the client went away: nothing is waiting for an answer any more
        finally:
            if waiter is not None:
                self.waiters.pop(waiter.id, None)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def finish(self, waiter_id: int, verdict: str, text: str) -> None:
        waiter = self.waiters.get(waiter_id)
        if waiter is not None:
            waiter.finish(verdict, text)

    def progress(self, waiter_id: int, text: str) -> None:
        waiter = self.waiters.get(waiter_id)
        if waiter is not None:
            waiter.progress(text)

    def close(self) -> None:
        for waiter in list(self.waiters.values()):
            waiter.finish("failed", "the service exited before the reload finished")
        if self._server is not None:
            self._server.close()


def parse_reload_options(options: list[str]) -> tuple[int | None, float | None]:
    """``canary=N`` and ``watch=SECONDS`` of a reload request; ValueError names a bad one."""
    canary: int | None = None
    watch: float | None = None
    for option in options:
        key, _, value = option.partition("=")
        try:
            if key == "canary":
                canary = int(value)
                if not 0 <= canary <= 1024:
                    raise ValueError
            elif key == "watch":
                watch = float(value)
                if not 0 < watch <= 86400:
                    raise ValueError
            else:
                raise KeyError(key)
        except KeyError:
            raise ValueError(
                f"unknown reload option {option!r} (canary=N, watch=SECONDS)"
            ) from None
        except ValueError:
            raise ValueError(f"bad reload option {option!r}") from None
    return canary, watch


# -- the client: `sdserve reload` -----------------------------------------------------------


class ReloadError(Exception):
    """The service could not be reached, or it is not the process that was named."""


def connect(pid: int, timeout: float | None) -> socket.socket:
    """A connection to the control socket of the sdserve process ``pid`` (checked to be
    held by that process); :class:`ReloadError` if there is none."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(control_address(pid))
        except ConnectionRefusedError:
            sock.connect(legacy_control_address(pid))
    except OSError as exc:
        sock.close()
        raise ReloadError(
            f"cannot reach the control socket of pid {pid} ({exc.strerror or exc}): "
            "is it an sdserve service that is running?"
        ) from exc
    peer, _uid, _gid = peer_credentials(sock)
    if peer != pid:
        sock.close()
        raise ReloadError(f"the control socket of pid {pid} is held by pid {peer}")
    return sock


def request_status(pid: int, *, timeout: float = 5.0) -> dict[str, Any]:
    """What the sdserve process ``pid`` says of itself (see :meth:`ControlServer`)."""
    sock = connect(pid, timeout)
    try:
        sock.sendall(b"status\n")
        line = sock.makefile("r", encoding="utf-8", errors="replace").readline()
    except TimeoutError as exc:
        raise ReloadError(f"no status from pid {pid} within {timeout:g}s") from exc
    finally:
        sock.close()
    verdict, _, text = line.rstrip("\n").partition(" ")
    if verdict != "status":
        raise ReloadError(f"pid {pid} did not give its status: {line.strip() or 'no answer'}")
    report: dict[str, Any] = json.loads(text)
    return report


def request_reload(
    pid: int,
    *,
    timeout: float | None,
    out: Callable[[str], None],
    canary: int | None = None,
    watch: float | None = None,
) -> bool:
    """Ask the sdserve process ``pid`` to reload (with a canary of ``canary`` workers
    watched for ``watch`` seconds, if given); True if it reloaded. ``out`` gets each line."""
    request = "reload"
    if canary is not None:
        request += f" canary={canary}"
    if watch is not None:
        request += f" watch={watch:g}"
    sock = connect(pid, timeout)
    try:
        sock.sendall(f"{request}\n".encode())
        stream = sock.makefile("r", encoding="utf-8", errors="replace")
        for line in stream:
            verdict, _, text = line.rstrip("\n").partition(" ")
            if verdict == "progress":
                out(text)
                continue
            out(f"{verdict}: {text}")
            return verdict == "ok"
        out("failed: the service closed the connection before the outcome (is it stopping?)")
        return False
    except TimeoutError as exc:
        raise ReloadError(f"no outcome from pid {pid} within {timeout:g}s") from exc
    finally:
        sock.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Ask a running sdserve service to reload (new code and configuration, zero-gap), "
        "print its progress (starting generation N, N/M ready) and its verdict (ok, failed "
        "or refused, with the reason), and exit with it. systemd runs it as ExecReload=; "
        "outside systemd, give the PID of `sdserve run`. A plain kill -HUP PID reloads "
        "too, but reports nothing. A service with workers = 0 refuses every reload."
    )
    parser.add_argument(
        "pid",
        nargs="?",
        type=int,
        help="the service's main PID (default: $MAINPID, which systemd sets for ExecReload=)",
    )
    parser.add_argument(
        "--canary",
        type=int,
        metavar="N",
        help="start N new workers first, beside the serving ones, and judge them (5xx "
        "ratio, p99) over --watch before the rest; a canary that does worse is rolled "
        "back, exit status 1 (default: the config's canary_workers, 0: none)",
    )
    parser.add_argument(
        "--watch",
        type=float,
        metavar="SECONDS",
        help="how long the canary serves before it passes (default: canary_watch, 30)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="give up waiting after this long, exit status 2 (default: wait; systemd "
        "bounds ExecReload= with its own timeout)",
    )
    parser.epilog = (
        "exit status: 0 reloaded (the new generation serves); 1 the reload failed, was "
        "refused or its canary was rolled back (the old code keeps serving); 2 no PID, "
        "the service could not be reached, or no verdict within --timeout"
    )


def run(args: argparse.Namespace) -> int:
    pid = args.pid
    if pid is None:
        text = os.environ.get("MAINPID", "")
        if not text.isdigit():
            print("sdserve reload: no PID given and $MAINPID is not set", file=sys.stderr)
            return 2
        pid = int(text)
    began = time.monotonic()

    def out(line: str) -> None:
        print(f"sdserve reload: {line}", flush=True)

    try:
        ok = request_reload(
            pid, timeout=args.timeout, out=out, canary=args.canary, watch=args.watch
        )
    except ReloadError as exc:
        print(f"sdserve reload: {exc}", file=sys.stderr)
        return 2
    if ok:
        out(f"done in {time.monotonic() - began:.2f}s")
    return 0 if ok else 1
