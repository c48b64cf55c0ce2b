"""A launcher that plays systemd's part, for tests, drills and demos outside systemd.

It holds the listening sockets for the whole run (as a ``.socket`` unit does), so
connections made while no instance is accepting wait in the kernel queue. It
starts sdserve with the sockets as fds 3, 4, ... and ``LISTEN_FDS``,
``LISTEN_FDNAMES`` and ``LISTEN_PID`` set, and it reads a real ``AF_UNIX``
datagram notify socket, with ``SO_PASSCRED`` so that each message carries the
sender's PID. ``restart`` is stop-then-start like ``systemctl restart``;
``reload`` sends SIGHUP and waits for ``RELOADING=1`` then ``READY=1`` (what
systemd sees of a reload), and ``reload_command`` runs ``sdserve reload PID`` as the
units' ``ExecReload=`` does, which also reports the outcome.

With ``fd_store_max`` it keeps a file descriptor store as systemd does for a unit
with ``FileDescriptorStoreMax=``: ``FDSTORE=1`` (with ``FDNAME=``) from the main
process adds the fds it carries, up to the maximum (more are closed, as systemd
does); ``FDSTOREREMOVE=1`` closes those of a name; the next instance gets them after
the listening sockets, named in ``LISTEN_FDNAMES``; ``$FDSTORE`` says the maximum, as
systemd 254 does. A ``stop`` that is not part of a ``restart`` releases the store.
Where systemd's job tells sdserve that a stop is part of a restart, the launcher's
``restart`` makes the file named in ``_SDSERVE_RESTART_FLAG`` exist while it stops.
Unlike systemd, it does not drop a stored fd whose peer hung up (the next instance
finds it closed).

``LISTEN_PID`` must be the PID of the process that reads it, which is not known
before the fork. A tiny trampoline (``python -I -S -c``) moves the sockets to
fds 3, 4, ..., sets the variables with its own PID and execs sdserve, which
keeps that PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .handover import FD_SPACE, close_fds, fds_in
from .intent import ENV_RESTART_FLAG

_TRAMPOLINE = """
import fcntl, os, sys
fds = [int(x) for x in os.environ.pop("_SDSERVE_LAUNCH_FDS").split(",")]
n = len(fds)
# first out of the way of fds 3 .. 3+n-1, so that no move overwrites an fd not moved yet
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 3 + n) for fd in fds]
for fd in fds:
    if fd >= 3 + n:
        os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ["LISTEN_FDS"] = str(n)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execvp(sys.argv[1], sys.argv[1:])
"""

_UCRED = struct.Struct("3i")


class HasFileno(Protocol):
    def fileno(self) -> int: ...


class LaunchError(Exception):
    """An instance did not start (it exited, or READY=1 did not come in time)."""


@dataclass(frozen=True)
class NotifyMessage:
    pid: int
    fields: Mapping[str, str]
    received: float
    #: fds that came with it (SCM_RIGHTS); whoever handles the message owns them
    fds: tuple[int, ...] = ()

    def has(self, key: str, value: str | None = None) -> bool:
        return key in self.fields and (value is None or self.fields[key] == value)


class NotifySink:
    """A real notify socket: receives sd_notify(3) datagrams and lets callers wait for them.

    ``address`` is a path, or ``@name`` for the abstract namespace. With
    ``on_message`` every message is also handed to that callback; with
    ``keep=False`` messages are not stored (a long-lived supervisor).
    """

    def __init__(
        self,
        address: Path | str,
        *,
        on_message: Callable[[NotifyMessage], None] | None = None,
        keep: bool = True,
    ) -> None:
        self.address = str(address)
        self.path = None if self.address.startswith("@") else Path(self.address)
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        bind_to = "\0" + self.address[1:] if self.path is None else self.address
        self.sock.bind(bind_to)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setblocking(False)
        self.messages: list[NotifyMessage] = []
        self._on_message = on_message
        self._keep = keep
        self._arrived = asyncio.Event()
        self._reading = False
        self.resume()

    def pause(self) -> None:
        """Stop reading: senders find the socket's queue full (a busy PID 1)."""
        if self._reading:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self._reading = False

    def resume(self) -> None:
        if not self._reading:
            asyncio.get_running_loop().add_reader(self.sock.fileno(), self._on_readable)
            self._reading = True

    def drain(self) -> None:
        """Handle every message already queued on the socket, now."""
        self._on_readable()

    def _on_readable(self) -> None:
        while True:
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(
                    65536, socket.CMSG_SPACE(_UCRED.size) + FD_SPACE
                )
            except (BlockingIOError, InterruptedError):
                return
            pid = 0
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _UCRED.unpack(cdata[: _UCRED.size])[0]
            fds = fds_in(ancdata)
            fields = dict(
                line.split("=", 1)
                for line in data.decode(errors="replace").split("\n")
                if "=" in line
            )
            message = NotifyMessage(pid, fields, time.monotonic(), tuple(fds))
            if self._on_message is None:
                close_fds(fds)  # nobody to own them
            if self._keep:
                self.messages.append(message)
                self._arrived.set()
            if self._on_message is not None:
                self._on_message(message)

    async def expect(
        self,
        match: Callable[[NotifyMessage], bool],
        *,
        timeout: float,
        start: int = 0,
    ) -> NotifyMessage:
        """The first message from index ``start`` on that matches; waits up to ``timeout``."""
        deadline = time.monotonic() + timeout
        index = start
        while True:
            while index < len(self.messages):
                message = self.messages[index]
                index += 1
                if match(message):
                    return message
            self._arrived.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching notify message within {timeout}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self.pause()
        self.sock.close()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


@dataclass
class Instance:
    """One started process."""

    process: asyncio.subprocess.Process
    log_path: Path
    started: float
    #: index of the first notify message that can belong to this instance
    first_message: int
    ready: float | None = None
    #: a stop signal (SIGTERM or SIGINT) was sent
    stop_sent: bool = False
    exited: asyncio.Task[int] = field(init=False)

    def __post_init__(self) -> None:
        self.exited = asyncio.ensure_future(self.process.wait())

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


class Launcher:
    """Holds sockets and a notify socket; starts, stops, restarts and reloads sdserve."""

    def __init__(
        self,
        argv: Sequence[str],
        sockets: Sequence[tuple[str, HasFileno]],
        *,
        workdir: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        fd_store_max: int = 0,
    ) -> None:
        self.argv = list(argv)
        self.cwd = cwd
        self.sockets = list(sockets)
        self.workdir = workdir
        self.extra_env = dict(env or {})
        self.fd_store_max = fd_store_max
        #: the fd store: (name, fd), in the order stored
        self.store: list[tuple[str, int]] = []
        #: fds released by a stop
        self.store_released = 0
        # AF_UNIX paths are limited to 107 bytes; a short private directory is always safe.
        self._sink_dir = Path(tempfile.mkdtemp(prefix="sdsn-"))
        self.sink = NotifySink(self._sink_dir / "notify.sock", on_message=self._on_notify)
        self._restart_flag = self._sink_dir / "restarting"
        self.instances: list[Instance] = []

    # -- the fd store --------------------------------------------------------------------

    def _on_notify(self, message: NotifyMessage) -> None:
        fds = list(message.fds)
        main = self.current is not None and message.pid == self.current.pid
        name = message.fields.get("FDNAME", "stored")
        if main and message.fields.get("FDSTORE") == "1" and self.fd_store_max:
            for fd in fds:
                if len(self.store) < self.fd_store_max:
                    self.store.append((name, fd))
                else:
                    os.close(fd)  # the store is full: systemd closes it too
            return
        for fd in fds:  # not for the store (NotifyAccess=main, or no store): closed
            os.close(fd)
        if main and message.fields.get("FDSTOREREMOVE") == "1":
            self._remove_stored(lambda stored: stored == name)

    def _remove_stored(self, match: Callable[[str], bool]) -> int:
        keep: list[tuple[str, int]] = []
        gone: list[tuple[str, int]] = []
        for name, fd in self.store:
            (gone if match(name) else keep).append((name, fd))
        self.store = keep
        for _, fd in gone:
            os.close(fd)
        return len(gone)

    def release_store(self) -> int:
        """Close every stored fd (a stop that is not a restart); returns how many."""
        released = self._remove_stored(lambda _name: True)
        self.store_released += released
        return released

    @property
    def current(self) -> Instance | None:
        return self.instances[-1] if self.instances else None

    @property
    def pid(self) -> int | None:
        return None if self.current is None else self.current.pid

    def _environment(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_"))
        }
        env.update(self.extra_env)
        env["NOTIFY_SOCKET"] = self.sink.address
        names = [name for name, _ in self.sockets] + [name for name, _ in self.store]
        env["LISTEN_FDNAMES"] = ":".join(names)
        env["_SDSERVE_LAUNCH_FDS"] = ",".join(str(fd) for fd in self._passed_fds())
        if self.fd_store_max:
            env["FDSTORE"] = str(self.fd_store_max)
            env[ENV_RESTART_FLAG] = str(self._restart_flag)
        return env

    def _passed_fds(self) -> list[int]:
        return [s.fileno() for _, s in self.sockets] + [fd for _, fd in self.store]

    async def spawn(self) -> Instance:
        """Start a process without waiting for READY=1."""
        n = len(self.instances)
        log_path = self.workdir / f"instance-{n}.log"
        first = len(self.sink.messages)
        with open(log_path, "wb") as log_file:  # noqa: ASYNC230 - a local file, opened once
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-I",
                "-S",
                "-c",
                _TRAMPOLINE,
                *self.argv,
                env=self._environment(),
                pass_fds=self._passed_fds(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                cwd=self.cwd,
            )
        instance = Instance(process, log_path, time.monotonic(), first)
        self.instances.append(instance)
        return instance

    async def wait_for(
        self,
        instance: Instance,
        match: Callable[[NotifyMessage], bool],
        *,
        timeout: float,
        start: int | None = None,
    ) -> NotifyMessage:
        """A message from ``instance``'s PID that matches; LaunchError if it exits first."""
        expect = asyncio.ensure_future(
            self.sink.expect(
                lambda m: m.pid == instance.pid and match(m),
                timeout=timeout,
                start=instance.first_message if start is None else start,
            )
        )
        try:
            await asyncio.wait({expect, instance.exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not expect.done():
                expect.cancel()
        if expect.done() and not expect.cancelled():
            return expect.result()
        raise LaunchError(
            f"pid {instance.pid} exited with status {instance.exited.result()} "
            f"before the expected notify message; its output:\n{instance.log_text()}"
        )

    async def start(self, *, timeout: float = 30.0) -> Instance:
        """Start a process and wait for its READY=1."""
        instance = await self.spawn()
        await self.wait_for(instance, lambda m: m.has("READY", "1"), timeout=timeout)
        instance.ready = time.monotonic()
        return instance

    def send_signal(self, sig: int) -> None:
        instance = self.current
        if instance is None or instance.exited.done():
            raise LaunchError("no running instance to signal")
        if sig in (signal.SIGTERM, signal.SIGINT):
            instance.stop_sent = True
        os.kill(instance.pid, sig)

    async def stop(
        self, *, timeout: float = 60.0, sig: int = signal.SIGTERM, keep_store: bool = False
    ) -> int:
        """Ask the running instance to stop (once) and wait for it; returns its exit status.

        Then the fd store is released, unless ``keep_store`` (a restart follows)."""
        instance = self.current
        if instance is None:
            raise LaunchError("nothing to stop")
        # like systemd, ask once: a second SIGTERM/SIGINT means "exit at once"
        if not instance.exited.done() and (not instance.stop_sent or sig == signal.SIGKILL):
            self.send_signal(sig)
        code = await asyncio.wait_for(asyncio.shield(instance.exited), timeout)
        self.sink.drain()  # what it sent before it exited (its last FDSTORE=1) counts
        if not keep_store:
            self.release_store()
        return code

    async def stop_for_restart(self, *, timeout: float = 60.0) -> int:
        """The stop of a restart: the instance is told a restart follows (as systemd's
        restart job tells it), and the fd store is kept. Returns the exit status."""
        self._restart_flag.touch()
        try:
            return await self.stop(timeout=timeout, keep_store=True)
        finally:
            self._restart_flag.unlink()

    async def restart(self, *, timeout: float = 60.0) -> Instance:
        """Like ``systemctl restart``: stop, then start. The sockets and the fd store stay
        meanwhile."""
        await self.stop_for_restart(timeout=timeout)
        return await self.start(timeout=timeout)

    async def reload(self, *, timeout: float = 60.0) -> float:
        """A plain SIGHUP, then RELOADING=1, then READY=1 (what systemd sees); returns seconds."""
        instance = self.current
        if instance is None:
            raise LaunchError("nothing to reload")
        mark = len(self.sink.messages)
        began = time.monotonic()
        os.kill(instance.pid, signal.SIGHUP)
        reloading = await self.wait_for(
            instance, lambda m: m.has("RELOADING", "1"), timeout=timeout, start=mark
        )
        after = self.sink.messages.index(reloading) + 1
        await self.wait_for(instance, lambda m: m.has("READY", "1"), timeout=timeout, start=after)
        return time.monotonic() - began

    async def reload_command(self, *args: str, timeout: float = 60.0) -> tuple[int, str]:
        """``sdserve reload PID ARGS``, as ``ExecReload=`` runs it: its exit status and
        output."""
        instance = self.current
        if instance is None:
            raise LaunchError("nothing to reload")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sdserve",
            "reload",
            str(instance.pid),
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        assert proc.returncode is not None
        return proc.returncode, out.decode(errors="replace")

    async def close(self) -> None:
        """Kill whatever still runs (with its process group), then close the notify socket."""
        for instance in self.instances:
            if not instance.exited.done():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(instance.pid, signal.SIGKILL)
                await instance.exited
        self.release_store()
        self.sink.close()
        with contextlib.suppress(OSError):
            self._restart_flag.unlink()
        with contextlib.suppress(OSError):
            self._sink_dir.rmdir()
