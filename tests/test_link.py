"""The link between the supervisor and a worker, with real socket pairs and real TCP
connections as the fds it carries: no connection may be closed on its way, whatever the
order in which the two ends stop.

Each test checks that a connection that went through the link still works end to end: the
client's bytes are read from the fd that came out, and an answer written there reaches
the client.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from sdserve.handover import Link, link_pair

pytestmark = pytest.mark.asyncio


@pytest.fixture
def server() -> Iterator[socket.socket]:
    sock = socket.create_server(("127.0.0.1", 0))
    yield sock
    sock.close()


def connection(server: socket.socket) -> tuple[socket.socket, int]:
    """A client socket and the server side's fd (owned by the caller)."""
    client = socket.create_connection(server.getsockname(), timeout=10)
    accepted, _addr = server.accept()
    return client, accepted.detach()


def works(client: socket.socket, fd: int) -> bool:
    """The connection behind ``fd`` carries bytes both ways (and ``fd`` is closed)."""
    with socket.socket(fileno=fd) as end:
        end.settimeout(10)
        client.sendall(b"ping")
        if end.recv(4) != b"ping":
            return False
        end.sendall(b"pong")
        return client.recv(4) == b"pong"


class Collect:
    """Fds a callback got, and an event when ``want`` of them have come."""

    def __init__(self, want: int = 1) -> None:
        self.fds: list[int] = []
        self.want = want
        self.enough = asyncio.Event()

    def __call__(self, fds: list[int]) -> None:
        self.fds.extend(fds)
        if len(self.fds) >= self.want:
            self.enough.set()


async def test_what_crosses_a_leaving_worker_comes_back_and_then_bye(
    server: socket.socket,
) -> None:
    ours, theirs = link_pair()
    got = Collect()
    returned = Collect()
    sup = Link(ours, Collect(), on_returned=returned)

    def give_back(fds: list[int]) -> None:  # a worker that has stopped serving
        got(fds)
        worker.give_back(fds)

    worker = Link(theirs, give_back)
    # the worker says it leaves, and the supervisor sends a connection before it reads that
    worker.say_leaving()
    client, fd = connection(server)
    sup.send([fd])
    await asyncio.wait_for(worker.leave(timeout=10), 10)  # BYE came after the connection
    assert got.fds, "BYE overtook the connection sent before it"
    await asyncio.wait_for(returned.enough.wait(), 10)
    assert sup.peer_leaving
    assert not sup.open_to_serve
    assert sup.lost == worker.lost == 0
    (back,) = returned.fds
    assert works(client, back)
    worker.close()
    sup.close()
    client.close()


async def test_a_send_to_a_worker_gone_goes_back_and_what_it_sent_is_still_read(
    server: socket.socket,
) -> None:
    ours, theirs = link_pair()
    handed_up = Collect()
    undelivered = Collect()
    sup = Link(ours, handed_up, on_undelivered=undelivered)
    # the worker hands a connection up and exits before the supervisor reads it
    worker = Link(theirs, Collect())
    up_client, up_fd = connection(server)
    worker.send([up_fd])
    worker.close()
    # the supervisor sends it one: the send fails, the connection comes back, not closed
    down_client, down_fd = connection(server)
    sup.send([down_fd])
    assert undelivered.fds == [down_fd]
    assert sup.lost == 0
    assert not sup.open_to_serve
    assert works(down_client, undelivered.fds[0])
    # and what the worker sent before it went is still read
    await asyncio.wait_for(handed_up.enough.wait(), 10)
    assert works(up_client, handed_up.fds[0])
    sup.close()
    up_client.close()
    down_client.close()


async def test_what_waits_to_be_sent_when_the_link_closes_goes_back(
    server: socket.socket,
) -> None:
    ours, theirs = link_pair()
    undelivered = Collect()
    sup = Link(ours, Collect(), on_undelivered=undelivered)
    # fill the worker's receive queue, so that further sends wait in the outbox
    clients: list[socket.socket] = []
    while not sup._outbox and len(clients) < 4096:
        client, fd = connection(server)
        clients.append(client)
        sup.send([fd])
    assert len(sup._outbox) == 1, "the socket pair never filled"
    sup.close()  # the worker exited, with the rest in its queue (closed with it)
    (back,) = undelivered.fds  # the last one, never sent
    assert sup.lost == 0
    assert works(clients[-1], back)
    theirs.close()
    for client in clients:
        client.close()


async def test_without_an_answer_leaving_waits_no_longer_than_its_bound() -> None:
    ours, theirs = link_pair()  # a supervisor that never answers (one that predates BYE)
    worker = Link(theirs, Collect())
    loop = asyncio.get_running_loop()
    started = loop.time()
    await worker.leave(timeout=0.2)
    assert 0.2 <= loop.time() - started < 5
    assert ours.recv(16) == b"L"
    worker.close()
    ours.close()


async def test_a_worker_without_undelivered_handler_counts_what_it_lost(
    server: socket.socket,
) -> None:
    ours, theirs = link_pair()
    worker = Link(theirs, Collect())
    ours.close()  # the supervisor is gone
    client, fd = connection(server)
    worker.send([fd])
    assert worker.lost == 1
    client.settimeout(10)
    assert client.recv(1) == b""  # closed, not leaked
    worker.close()
    client.close()
