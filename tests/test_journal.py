"""The journal sender (issue 11): journald's native protocol from a Python socket, so that a
stalled journald stalls only the thread that writes to it, never the GIL.

The receiving end here is a real unix datagram socket standing in for journald's (the
system test, tests/system/test_stalls.py, stops the real journald). The parser below
follows the protocol as systemd documents it.
"""

from __future__ import annotations

import array
import fcntl
import logging
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from systemd.journal import JournalHandler

from sdserve.journal import JournalSender


def parse(entry: bytes) -> dict[str, bytes]:
    fields: dict[str, bytes] = {}
    i = 0
    while i < len(entry):
        end = entry.index(b"\n", i)
        line = entry[i:end]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            i = end + 1
        else:  # KEY \n <u64 length> value \n
            key = line
            (length,) = struct.unpack("<Q", entry[end + 1 : end + 9])
            value = entry[end + 9 : end + 9 + length]
            assert entry[end + 9 + length : end + 10 + length] == b"\n"
            i = end + 10 + length
        fields[key.decode()] = value
    return fields


def receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One datagram; the fds passed with it."""
    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(1 << 20, socket.CMSG_SPACE(4 * fds.itemsize))
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
    return data, list(fds)


@pytest.fixture
def journald(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "journal.socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)  # an upper bound on each receive
    yield path, sock
    sock.close()


def test_fields_and_multiline_values_in_the_native_protocol(
    journald: tuple[str, socket.socket],
) -> None:
    path, sock = journald
    sender = JournalSender(path)
    handler = JournalHandler(sender_function=sender, SYSLOG_IDENTIFIER="sdserve")
    log = logging.getLogger("sdserve.test-journal")
    log.propagate = False
    log.addHandler(handler)
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("it failed: %s", "why", extra={"SDSERVE_PHASE": "drain"})
    finally:
        log.removeHandler(handler)
        sender.close()
    data, fds = receive(sock)
    assert fds == []
    fields = parse(data)
    assert fields["MESSAGE"].startswith(b"it failed: why\nTraceback (most recent call last)")
    assert b"ValueError: boom" in fields["MESSAGE"]
    assert fields["PRIORITY"] == b"3"
    assert fields["SDSERVE_PHASE"] == b"drain"
    assert fields["LOGGER"] == b"sdserve.test-journal"
    assert fields["SYSLOG_IDENTIFIER"] == b"sdserve"
    assert fields["CODE_FUNC"] == b"test_fields_and_multiline_values_in_the_native_protocol"
    assert int(fields["CODE_LINE"]) > 0
    # the record's own attributes (msg, args, levelname...) are not journal fields
    assert all(key.isupper() for key in fields), sorted(fields)


def test_an_entry_too_large_for_a_datagram_goes_in_a_sealed_memfd(
    journald: tuple[str, socket.socket],
) -> None:
    path, sock = journald
    sender = JournalSender(path)
    sender.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # EMSGSIZE past it
    message = "x" * 300_000
    sender(message, CODE_FILE="f.py", CODE_LINE=1, CODE_FUNC="f", SDSERVE_PHASE="big")
    data, fds = receive(sock)
    assert data == b""
    assert len(fds) == 1
    try:
        seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE
        assert seals & fcntl.F_SEAL_SHRINK
        entry = os.pread(fds[0], 1 << 20, 0)
    finally:
        os.close(fds[0])
    fields = parse(entry)
    assert fields["MESSAGE"] == message.encode()
    assert fields["SDSERVE_PHASE"] == b"big"
    sender.close()


#: the child: a thread floods the journal socket (unread: its send blocks), and the main
#: thread, once the flood has stalled, reports how far it got and exits. With a sender that
#: kept the GIL while blocked, the main thread could never run again: the child would hang.
_CHILD = """
import os, sys, threading
from sdserve.journal import JournalSender, encode

sender = JournalSender(sys.argv[1])
entry = encode([("MESSAGE", "a line"), ("PRIORITY", 6)])
sent = 0
stalled = threading.Event()

def flood():
    global sent
    for _ in range(100_000):
        sender.send(entry)
        sent += 1

threading.Thread(target=flood, daemon=True).start()
last = -1
while sent != last:  # each wait yields the GIL; the flood stops moving once it blocks
    last = sent
    stalled.wait(0.05)
print(sent, flush=True)
os._exit(0)
"""


def test_a_sender_blocked_on_a_full_journal_leaves_other_threads_running(
    journald: tuple[str, socket.socket],
) -> None:
    path, sock = journald
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, path],
        capture_output=True,
        text=True,
        timeout=30,  # a sender holding the GIL makes the child hang: TimeoutExpired
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr
    sent = int(done.stdout)
    assert 0 < sent < 100_000, sent  # it stopped on the full socket, and the child ran on
    data, _ = receive(sock)  # what it sent is there, whole
    assert parse(data)["MESSAGE"] == b"a line"
