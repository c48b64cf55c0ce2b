from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.drill.servers import FaultyServer


@pytest.fixture
def faulty() -> Iterator[Callable[..., FaultyServer]]:
    """Start faulty servers; each is killed at the end if the test did not stop it."""
    started: list[FaultyServer] = []

    def start(*args: str) -> FaultyServer:
        server = FaultyServer.start(*args)
        started.append(server)
        return server

    yield start
    for s in started:
        s.kill()
