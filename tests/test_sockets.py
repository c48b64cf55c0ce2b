"""Taking sockets from systemd, and binding them when not socket-activated."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sdserve.activation import ActivationError, listeners_from_environ
from sdserve.binding import BindError, bind_address, parse_address
from sdserve.exitcodes import ExitCode
from sdserve.launcher import LaunchError
from tests.conftest import ROOT, LauncherFactory
from tests.helpers import get, read_response, request_bytes


def test_parse_addresses() -> None:
    assert str(parse_address("127.0.0.1:8080")) == "127.0.0.1:8080"
    assert str(parse_address("[::1]:8080")) == "[::1]:8080"
    # a bare port is the default host's, as the default 127.0.0.1:8080 is
    assert str(parse_address(":8080")) == "127.0.0.1:8080"
    assert str(parse_address("8080")) == "127.0.0.1:8080"
    assert str(parse_address("0.0.0.0:8080")) == "0.0.0.0:8080"
    assert parse_address("localhost:8080").family == socket.AF_UNSPEC  # resolved at bind
    assert str(parse_address("unix:/run/x.sock")) == "unix:/run/x.sock"
    for bad, why in [
        ("127.0.0.1:http", "port 'http' is not a number"),
        ("::1:80", "put an IPv6 address in brackets"),
        ("bad host!:80", "'bad host!' is not an IP address or host name"),
        ("10.1:80", "'10.1' is not an IP address or host name"),
        ("[localhost]:80", "'localhost' is not an IPv6 address"),
        ("127.0.0.1:99999", "out of range"),
        ("unix:", "needs a path"),
    ]:
        with pytest.raises(BindError, match=why):
            parse_address(bad)


def test_busy_address_names_it() -> None:
    busy = socket.create_server(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    try:
        with pytest.raises(BindError) as info:
            bind_address(f"127.0.0.1:{port}", "http", 16)
        assert str(info.value) == (
            f"cannot bind 127.0.0.1:{port}: address already in use (EADDRINUSE)"
        )
    finally:
        busy.close()


def test_stale_unix_socket_is_replaced_but_live_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "app.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    listener = bind_address(f"unix:{path}", "http", 16)
    try:
        with pytest.raises(BindError, match="already in use"):
            bind_address(f"unix:{path}", "http", 16)
    finally:
        listener.sock.close()


def test_busy_address_from_cli_exits_2() -> None:
    busy = socket.create_server(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    try:
        result = subprocess.run(
            [sys.executable, "-m", "sdserve", "run", "sdserve.demo:create_app"]  # noqa: RUF005
            + ["--bind", f"127.0.0.1:{port}", "--log", "stderr"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={"PATH": "/usr/bin:/bin"},
            timeout=60,
            check=False,
        )
    finally:
        busy.close()
    assert result.returncode == ExitCode.CONFIG
    assert f"cannot bind 127.0.0.1:{port}: address already in use (EADDRINUSE)" in result.stderr


@pytest.mark.asyncio
async def test_several_named_sockets_of_each_family(
    make_launcher: LauncherFactory, tmp_path: Path
) -> None:
    v4 = socket.create_server(("127.0.0.1", 0))
    v6 = socket.create_server(("::1", 0), family=socket.AF_INET6)
    unix_path = tmp_path / "admin.sock"
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(unix_path))
    unix.listen(16)
    launcher = make_launcher(sockets=[("http", v4), ("http", v6), ("admin", unix)])
    try:
        instance = await launcher.start()
        assert (await get("127.0.0.1", v4.getsockname()[1], "/")).status == 200
        assert (await get("::1", v6.getsockname()[1], "/")).status == 200
        reader, writer = await asyncio.open_unix_connection(str(unix_path))
        writer.write(request_bytes("/readyz", close=True))
        admin = await read_response(reader)
        writer.close()
        assert admin.status == 200  # the admin socket serves health, not the app
        reader, writer = await asyncio.open_unix_connection(str(unix_path))
        writer.write(request_bytes("/", close=True))
        assert (await read_response(reader)).status == 404
        writer.close()
        log = instance.log_text()
        assert "sockets taken from systemd: http=127.0.0.1:" in log
        assert f"admin=unix:{unix_path}" in log
        assert await launcher.stop() == 0
    finally:
        for s in (v4, v6, unix):
            s.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("pipe", "fd 3 (name 'http') is not a socket"),
        ("udp", "fd 3 (name 'http') is a SOCK_DGRAM socket; sdserve serves stream sockets"),
        ("unlistened", "fd 3 (name 'http') is a stream socket but is not listening"),
    ],
)
async def test_bad_fd_is_named(make_launcher: LauncherFactory, kind: str, message: str) -> None:
    closers: list[object] = []
    if kind == "pipe":
        r, w = os.pipe()
        obj: object = _Fd(r)
        closers = [r, w]
    elif kind == "udp":
        obj = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        closers = [obj]
    else:
        obj = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        closers = [obj]
    launcher = make_launcher(sockets=[("http", obj)])
    try:
        with pytest.raises(LaunchError) as info:
            await launcher.start(timeout=30)
        assert "exited with status 2" in str(info.value)
        assert message in str(info.value)
    finally:
        for c in closers:
            if isinstance(c, int):
                os.close(c)
            else:
                assert isinstance(c, socket.socket)
                c.close()


class _Fd:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


def test_foreign_listen_pid_under_systemd_is_an_error(tmp_path: Path) -> None:
    """NOTIFY_SOCKET set: systemd started us, so a foreign LISTEN_PID means a fork in
    between; binding another socket instead would serve on the wrong address."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "sdserve", "run", "sdserve.demo:create_app", "--log", "stderr"],
            cwd=ROOT,
            env={
                "PATH": "/usr/bin:/bin",
                "LISTEN_FDS": "1",
                "LISTEN_PID": "1",
                "NOTIFY_SOCKET": str(tmp_path / "notify"),
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        notify.close()
    assert done.returncode == ExitCode.CONFIG, done.stderr
    assert "LISTEN_PID=1 is not this process" in done.stderr
    assert "a wrapper script without exec?" in done.stderr
    assert "sockets bound" not in done.stderr


@pytest.mark.parametrize("count", ["99999999999999999999", "30000"])
def test_listen_fds_beyond_the_fd_limit_is_a_clear_error(count: str) -> None:
    environ = {"LISTEN_FDS": count, "LISTEN_PID": str(os.getpid())}
    with pytest.raises(ActivationError, match=rf"LISTEN_FDS={count}: more sockets than"):
        listeners_from_environ(environ, os.getpid())


def test_foreign_listen_pid_is_ignored_with_a_warning() -> None:
    """LISTEN_* inherited from a parent: warn, and bind the configured address instead."""
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    with subprocess.Popen(
        [sys.executable, "-m", "sdserve", "run", "sdserve.demo:create_app"]  # noqa: RUF005
        + ["--bind", f"127.0.0.1:{port}", "--log", "stderr"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "LISTEN_FDS": "1", "LISTEN_PID": "1"},
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stderr is not None
            lines = []
            for line in proc.stderr:  # bounded: the process logs "ready" or exits
                lines.append(line)
                if "ready after" in line:
                    break
            text = "".join(lines)
            assert "ignoring LISTEN_FDS=1: LISTEN_PID=1 is not this process" in text
            assert f"sockets bound: http=127.0.0.1:{port}" in text
        finally:
            proc.terminate()
            assert proc.wait(timeout=30) == 0
