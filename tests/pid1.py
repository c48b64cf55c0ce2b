"""Helpers for the tests of sdserve as PID 1 (``tests/test_pid1.py``, and in a container
``tests/system/test_container.py``): its JSON log lines as events, the orphans of
``tests/apps/orphans.py``, and the host's view of a PID namespace's processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers import HOST, read_response

Line = dict[str, Any]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def stat(pid: int) -> tuple[str, int]:
    """(state, ppid) of a host PID."""
    text = Path(f"/proc/{pid}/stat").read_text()
    state, ppid = text[text.rindex(")") + 2 :].split()[:2]
    return state, int(ppid)


def host_children(pid: int) -> list[int]:
    """Host PIDs whose parent is ``pid`` (re-parented orphans included)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError):
                if stat(int(entry.name))[1] == pid:
                    found.append(int(entry.name))
    return found


def zombies(pid: int) -> list[int]:
    """The zombie children of host PID ``pid``."""
    found = []
    for child in host_children(pid):
        with contextlib.suppress(OSError):
            if stat(child)[0] == "Z":
                found.append(child)
    return found


def inner_pid(pid: int) -> int:
    """A host PID's PID in its innermost PID namespace (the last of ``NSpid:``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    raise AssertionError(f"no NSpid line for {pid}")


def reaped(line: Line) -> bool:
    """A line of the reaper's on an orphan it reaped."""
    return line["logger"] == "sdserve.reaper" and "orphan" in line


def stop_seen(line: Line) -> bool:
    """PID 1's line on a stop signal (the supervisor's, or the single process's)."""
    return line["pid"] == 1 and line.get("phase") == "signal"


def ready(line: Line) -> bool:
    """PID 1's line once it serves (the supervisor's, or the single process's)."""
    return line["pid"] == 1 and line.get("phase") == "ready"


@dataclass
class JsonLog:
    """The JSON lines of a process's stdout, as they arrive; lines that are not JSON
    objects are kept in ``bad``."""

    stream: asyncio.StreamReader
    lines: list[Line] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    ended: bool = False
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def read(self) -> None:
        try:
            async for raw in self.stream:
                try:
                    line = json.loads(raw)
                except ValueError:
                    line = None
                if isinstance(line, dict):
                    self.lines.append(line)
                else:
                    self.bad.append(raw.decode(errors="replace"))
                self._arrived.set()
        finally:
            self.ended = True
            self._arrived.set()

    async def expect(
        self, what: str, match: Callable[[Line], bool], count: int = 1, timeout: float = 60
    ) -> list[Line]:
        """Wait until ``count`` lines satisfy ``match``; returns them."""
        async with asyncio.timeout(timeout):
            while True:
                found = [line for line in self.lines if match(line)]
                if len(found) >= count:
                    return found
                if self.ended:
                    raise AssertionError(f"the log ended before {what}: {self.lines[-5:]}")
                self._arrived.clear()
                await self._arrived.wait()


async def post(port: int, path: str) -> str:
    """One POST without a body on a new connection; the answer must be 200."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        response = await read_response(reader)
    finally:
        writer.close()
    assert response.status == 200, response.body
    return response.body.decode()


async def make_orphans(port: int, n: int, status: int) -> set[int]:
    """``n`` orphans (their PIDs inside the namespace) that exit with ``status``."""
    pids = {int(p) for p in (await post(port, f"/orphans?n={n}&status={status}")).split()}
    assert len(pids) == n
    return pids


async def wait_exited(pids: list[int], timeout: float) -> None:
    """Wait on pidfds until every one of these host PIDs has exited (zombie or gone)."""
    fds = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            fds.append(os.pidfd_open(pid))
    loop = asyncio.get_running_loop()
    pending = set(fds)
    gone = asyncio.Event()

    def readable(fd: int) -> None:
        loop.remove_reader(fd)
        pending.discard(fd)
        if not pending:
            gone.set()

    try:
        if not pending:
            return
        for fd in fds:
            loop.add_reader(fd, readable, fd)
        await asyncio.wait_for(gone.wait(), timeout)
    finally:
        for fd in pending:
            loop.remove_reader(fd)
        for fd in fds:
            os.close(fd)
