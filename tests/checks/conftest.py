"""Fixtures of the checks tests: services under the launcher, private dependencies."""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path

import pytest
import pytest_asyncio

from .helpers import RedisServer, Service, TcpProxy, make_service

ServiceFactory = Callable[..., Service]


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound on 127.0.0.1 with no listener: connections are refused, race-free."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


@pytest_asyncio.fixture
async def service_factory(tmp_path: Path) -> AsyncIterator[ServiceFactory]:
    """Build services of the checks test app; every process is killed and socket closed after."""
    made: list[tuple[Service, list[socket.socket]]] = []

    def factory(
        config: str, *, env: Mapping[str, str] | None = None, log_level: str = "info"
    ) -> Service:
        directory = tmp_path / f"service-{len(made)}"
        directory.mkdir()
        service, sockets = make_service(directory, config, env=env, log_level=log_level)
        made.append((service, sockets))
        return service

    yield factory
    for service, sockets in made:
        await service.launcher.close()
        for sock in sockets:
            sock.close()


@pytest_asyncio.fixture
async def private_redis() -> AsyncIterator[RedisServer]:
    """A redis-server of the test's own (not started yet): unix socket only, no persistence."""
    # a short directory: AF_UNIX paths are limited to 107 bytes
    directory = Path(tempfile.mkdtemp(prefix="sdrd-"))
    server = RedisServer(directory)
    yield server
    if server.proc is not None:
        await server.kill()
    shutil.rmtree(directory)


@pytest_asyncio.fixture
async def pg_proxy() -> AsyncIterator[TcpProxy]:
    """A TCP proxy in front of the shared PostgreSQL, which the test can take down."""
    proxy = TcpProxy("127.0.0.1", 5432)
    await proxy.start()
    yield proxy
    await proxy.close()
