"""Journal entries over journald's native protocol, from Python's own socket.

systemd-python's ``JournalHandler`` formats the entry (its fields: ``MESSAGE``,
``PRIORITY``, ``LOGGER``, ``CODE_*``, ``THREAD_NAME``, the record's upper-case extras)
and hands it to a sender; its own sender, ``sd_journal_sendv``, keeps the GIL while it
waits. When journald stalls (stopped, or its socket's queue full) that wait stops every
thread of the process, the event loop too, which defeats the writer thread of
:mod:`sdserve.log`. :class:`JournalSender` is a sender that sends the same entry on a
Python socket: a blocking send there releases the GIL, so only the writer thread waits.

The protocol (systemd's ``systemd.journal-fields(7)`` and ``sd_journal_sendv(3)``): one
datagram per entry to ``/run/systemd/journal/socket``, a ``KEY=value`` line per field; a
value that holds a newline goes as ``KEY``, a newline, its length as 64-bit
little-endian, the value and a newline. An entry too large for one datagram goes in a
sealed memfd passed with ``SCM_RIGHTS``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import struct
from typing import Any

JOURNAL_SOCKET = "/run/systemd/journal/socket"

#: journald keeps fields whose names are upper-case letters, digits and underscores, not
#: starting with an underscore (those are trusted fields journald adds itself)
_FIELD = re.compile(r"[A-Z0-9][A-Z0-9_]*\Z")
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def _value(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8", "replace")


def encode(fields: list[tuple[str, Any]]) -> bytes:
    """One entry in the native protocol; fields with names journald would drop are left out."""
    out = bytearray()
    for key, value in fields:
        if value is None or not _FIELD.match(key):
            continue
        data = _value(value)
        name = key.encode("ascii")
        if b"\n" in data:
            out += name + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name + b"=" + data + b"\n"
    return bytes(out)


class JournalSender:
    """A ``sender_function`` for systemd-python's ``JournalHandler`` (see the module doc)."""

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def __call__(
        self,
        MESSAGE: str,  # the journal's field names, as JournalHandler passes them
        MESSAGE_ID: Any = None,
        CODE_FILE: str | None = None,
        CODE_LINE: int | None = None,
        CODE_FUNC: str | None = None,
        **more: Any,
    ) -> None:
        fields: list[tuple[str, Any]] = [("MESSAGE", MESSAGE)]
        if MESSAGE_ID is not None:
            fields.append(("MESSAGE_ID", getattr(MESSAGE_ID, "hex", MESSAGE_ID)))
        fields += [("CODE_FILE", CODE_FILE), ("CODE_LINE", CODE_LINE), ("CODE_FUNC", CODE_FUNC)]
        fields += [(k, v) for k, v in more.items() if k not in ("MESSAGE", "MESSAGE_ID")]
        self.send(encode(fields))

    def send(self, entry: bytes) -> None:
        try:
            self.sock.sendto(entry, self.path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_large(entry)

    def _send_large(self, entry: bytes) -> None:
        fd = os.memfd_create("journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(entry)
            while view:
                view = view[os.write(fd, view) :]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
            self.sock.sendmsg([], rights, 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        self.sock.close()
