"""Test helpers for the checks and health tests: the service under the launcher of
:mod:`sdserve.launcher`, a private redis-server, and a TCP proxy the test can take down.

Everything waits on something real: a notify datagram, a line on a pipe, a
process exit. Timeouts are only upper bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from sdserve.launcher import Instance, Launcher, NotifyMessage

CHECKOUT = Path(__file__).resolve().parents[2]
APP = "tests.checks.apps:factory"


@dataclass
class Service:
    """``sdserve run`` of the checks test app under the launcher (sockets ``http``, ``admin``)."""

    launcher: Launcher
    port: int
    admin_port: int
    flags: Path

    def url(self, path: str, *, admin: bool = False) -> str:
        return f"http://127.0.0.1:{self.admin_port if admin else self.port}{path}"

    def flag(self, name: str, on: bool = True) -> None:
        """Turn a behaviour of the test app on or off (its check reads the flag at each run)."""
        path = self.flags / name
        if on:
            path.touch()
        else:
            path.unlink(missing_ok=True)

    @property
    def messages(self) -> list[NotifyMessage]:
        return self.launcher.sink.messages

    @property
    def instance(self) -> Instance:
        assert self.launcher.current is not None
        return self.launcher.current

    async def expect(
        self, match: Callable[[NotifyMessage], bool], *, timeout: float, start: int | None = None
    ) -> NotifyMessage:
        return await self.launcher.wait_for(self.instance, match, timeout=timeout, start=start)

    async def expect_status(
        self, text: str, *, timeout: float, start: int | None = None, prefix: bool = False
    ) -> NotifyMessage:
        """The next STATUS= that contains ``text`` (or starts with it)."""

        def match(m: NotifyMessage) -> bool:
            status = m.fields.get("STATUS")
            if status is None:
                return False
            return status.startswith(text) if prefix else text in status

        return await self.expect(match, timeout=timeout, start=start)

    def log_text(self) -> str:
        return "\n".join(i.log_text() for i in self.launcher.instances)


def make_service(
    tmp_path: Path, config: str, *, env: Mapping[str, str] | None = None, log_level: str = "info"
) -> tuple[Service, list[socket.socket]]:
    """A service on two already-bound sockets (race-free); start it with ``launcher.start()``."""
    flags = tmp_path / "flags"
    flags.mkdir(exist_ok=True)
    cfg = tmp_path / "sdserve.toml"
    cfg.write_text(config)
    main = socket.create_server(("127.0.0.1", 0), backlog=4096)
    admin = socket.create_server(("127.0.0.1", 0), backlog=128)
    argv = [sys.executable, "-m", "sdserve", "run", APP, "--config", str(cfg)]
    argv += ["--log", "stderr", "--log-level", log_level]
    launcher = Launcher(
        argv,
        [("http", main), ("admin", admin)],
        workdir=tmp_path,
        env={"CHECKS_APP_FLAGS": str(flags), **(env or {})},
        cwd=CHECKOUT,
    )
    service = Service(launcher, main.getsockname()[1], admin.getsockname()[1], flags)
    return service, [main, admin]


class RedisServer:
    """A private redis-server on a unix socket: no port, no persistence."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket_path = directory / "redis.sock"
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    async def start(self, timeout: float = 20.0) -> float:
        """Start, wait until it accepts connections; returns the monotonic time then."""
        self.proc = await asyncio.create_subprocess_exec(
            "redis-server",
            "--port",
            "0",
            "--unixsocket",
            str(self.socket_path),
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert self.proc.stdout is not None
        seen: list[bytes] = []
        async with asyncio.timeout(timeout):
            while line := await self.proc.stdout.readline():
                seen.append(line)
                if b"ready to accept connections" in line.lower():
                    ready = time.monotonic()
                    break
            else:
                raise RuntimeError(f"redis-server exited: {b''.join(seen)!r}")
        self._drain = asyncio.create_task(self._discard(self.proc.stdout))
        return ready

    @staticmethod
    async def _discard(stream: asyncio.StreamReader) -> None:
        while await stream.read(65536):
            pass

    async def kill(self) -> float:
        """SIGKILL and wait for the exit; returns the monotonic time it was gone."""
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()
        await self._drain
        self.socket_path.unlink(missing_ok=True)
        self.proc = None
        return time.monotonic()


class TcpProxy:
    """A TCP proxy on 127.0.0.1 in front of a real service, which the test can take down.

    Down, it resets every connection it has and every new one (the listening
    socket stays, so the port never changes hands); up, it forwards again.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.up = True
        self.server: asyncio.Server | None = None
        self.port = 0
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    @staticmethod
    def _reset(writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
        writer.transport.abort()

    def down(self) -> None:
        self.up = False
        for a, b in list(self._pairs):
            self._reset(a)
            b.transport.abort()
        self._pairs.clear()

    def set_up(self) -> None:
        self.up = True

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            self._reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self._reset(writer)
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in pumps:
                t.cancel()
            await asyncio.wait(pumps)
            self._pairs.discard(pair)
            writer.transport.abort()
            up_writer.transport.abort()

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()

    async def close(self) -> None:
        self.down()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
