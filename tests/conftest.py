"""Fixtures: a held listening socket, a launcher playing systemd's part, a request gate."""

from __future__ import annotations

import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from sdserve.launcher import Launcher
from tests.helpers import Gate, write_app

ROOT = Path(__file__).resolve().parent.parent
APP = "tests.apps.controlled:create_app"


@pytest.fixture
def listen_sock() -> Iterator[socket.socket]:
    """A listening TCP socket on 127.0.0.1, bound before any instance starts (race-free)."""
    sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
    yield sock
    sock.close()


@pytest.fixture
def port(listen_sock: socket.socket) -> int:
    return int(listen_sock.getsockname()[1])


@pytest_asyncio.fixture
async def gate(tmp_path: Path) -> AsyncIterator[Gate]:
    g = Gate(tmp_path / "gate.sock")
    await g.start()
    yield g
    await g.close()


LauncherFactory = Callable[..., Launcher]


@pytest_asyncio.fixture
async def make_launcher(
    tmp_path: Path, listen_sock: socket.socket, gate: Gate
) -> AsyncIterator[LauncherFactory]:
    """Build launchers for ``sdserve run`` of the controlled app (or ``argv``); closed after."""
    made: list[Launcher] = []

    def factory(
        *args: str,
        env: dict[str, str] | None = None,
        sockets: list[tuple[str, object]] | None = None,
        app: str = APP,
        fd_store_max: int = 0,
    ) -> Launcher:
        # single-process mode: the worker runtime itself, without the supervisor
        argv = [sys.executable, "-m", "sdserve", "run", app, "--workers", "0", "--log", "stderr"]
        argv += args
        launcher = Launcher(
            argv,
            sockets if sockets is not None else [("http", listen_sock)],  # type: ignore[arg-type]
            workdir=tmp_path,
            env={"TESTAPP_GATE": str(gate.path), **(env or {})},
            cwd=ROOT,
            fd_store_max=fd_store_max,
        )
        made.append(launcher)
        return launcher

    yield factory
    for launcher in made:
        await launcher.close()


MakeSupervised = Callable[..., Launcher]


@pytest_asyncio.fixture
async def supervised(tmp_path: Path, listen_sock: socket.socket) -> AsyncIterator[MakeSupervised]:
    """Launchers of ``sdserve run relapp:create_app --workers N`` in a directory of its own."""
    made: list[Launcher] = []
    appdir = tmp_path / "app"
    appdir.mkdir()
    write_app(appdir, "v1")

    def factory(
        *args: str, workers: int = 2, env: dict[str, str] | None = None, fd_store_max: int = 0
    ) -> Launcher:
        argv = [sys.executable, "-m", "sdserve", "run", "relapp:create_app"]
        argv += ["--workers", str(workers), "--log", "stderr", *args]
        launcher = Launcher(
            argv,
            [("http", listen_sock)],
            workdir=tmp_path,
            env={"PYTHONDONTWRITEBYTECODE": "1", **(env or {})},
            cwd=appdir,
            fd_store_max=fd_store_max,
        )
        made.append(launcher)
        return launcher

    yield factory
    for launcher in made:
        await launcher.close()
