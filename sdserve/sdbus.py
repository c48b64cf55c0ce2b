"""Just enough of D-Bus to ask systemd one thing: the type of the job on this unit.

sdserve must tell a ``systemctl restart`` from a ``systemctl stop`` when its SIGTERM
arrives (:func:`sdserve.handover.restart_pending`), and only systemd's job for the unit
says which. ``busctl`` cannot be used for it: under ``DynamicUser=`` it fails before it
asks ("Failed to get credentials"), while the bus itself accepts the connection. So this
speaks the wire protocol itself, as a client of the system bus: the ``EXTERNAL``
authentication with this process's uid, ``Hello``, and two ``Properties.Get`` calls on
``/org/freedesktop/systemd1/unit/self`` (systemd resolves ``self`` to the caller's unit)
and on the job's object. Little-endian messages, strings, object paths, signatures and
variants of those: nothing else is needed, nothing else is implemented.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Mapping

SYSTEM_BUS = "/run/dbus/system_bus_socket"
_METHOD_CALL, _METHOD_RETURN, _ERROR = 1, 2, 3
_PATH, _INTERFACE, _MEMBER, _ERROR_NAME, _REPLY_SERIAL, _DESTINATION, _SIGNATURE = (
    1,
    2,
    3,
    4,
    5,
    6,
    8,
)


class BusError(Exception):
    """The bus refused, or answered with an error (its name and message)."""


def _pad(buf: bytearray, align: int) -> None:
    buf.extend(b"\0" * (-len(buf) % align))


def _string(buf: bytearray, text: str) -> None:
    data = text.encode()
    _pad(buf, 4)
    buf.extend(struct.pack("<I", len(data)) + data + b"\0")


def _signature(buf: bytearray, sig: str) -> None:
    data = sig.encode()
    buf.extend(bytes([len(data)]) + data + b"\0")


def method_call(
    serial: int,
    *,
    path: str,
    interface: str,
    member: str,
    destination: str,
    args: tuple[str, ...] = (),
) -> bytes:
    """A METHOD_CALL message whose arguments are all strings."""
    body = bytearray()
    for arg in args:
        _string(body, arg)
    fields = bytearray()
    for code, sig, value in (
        (_PATH, "o", path),
        (_INTERFACE, "s", interface),
        (_MEMBER, "s", member),
        (_DESTINATION, "s", destination),
        *(((_SIGNATURE, "g", "s" * len(args)),) if args else ()),
    ):
        _pad(fields, 8)
        fields.append(code)
        _signature(fields, sig)
        if sig == "g":
            _signature(fields, value)
        else:
            _string(fields, value)
    head = bytearray(b"l" + bytes([_METHOD_CALL, 0, 1]))
    head += struct.pack("<III", len(body), serial, len(fields))
    head += fields
    _pad(head, 8)
    return bytes(head + body)


class _Reader:
    """Reads values out of a message body (little-endian), with D-Bus alignment."""

    def __init__(self, data: bytes, offset: int = 0) -> None:
        self.data = data
        self.pos = offset

    def align(self, n: int) -> None:
        self.pos += -self.pos % n

    def u32(self) -> int:
        self.align(4)
        (value,) = struct.unpack_from("<I", self.data, self.pos)
        self.pos += 4
        return int(value)

    def string(self) -> str:
        n = self.u32()
        text = self.data[self.pos : self.pos + n].decode()
        self.pos += n + 1
        return text

    def signature(self) -> str:
        n = self.data[self.pos]
        text = self.data[self.pos + 1 : self.pos + 1 + n].decode()
        self.pos += n + 2
        return text


async def _read_message(reader: asyncio.StreamReader) -> tuple[int, dict[int, object], bytes]:
    """One message: its type, its header fields, its body."""
    fixed = await reader.readexactly(16)
    if fixed[0:1] != b"l":
        raise BusError("a big-endian message: not spoken here")
    body_len, _serial, fields_len = struct.unpack_from("<III", fixed, 4)
    rest = await reader.readexactly(fields_len + (-(16 + fields_len) % 8) + body_len)
    whole = fixed + rest
    fields: dict[int, object] = {}
    r = _Reader(whole, 16)
    end = 16 + fields_len
    while r.pos < end:
        r.align(8)
        if r.pos >= end:
            break
        code = whole[r.pos]
        r.pos += 1
        sig = r.signature()
        if sig in ("s", "o"):
            fields[code] = r.string()
        elif sig == "g":
            fields[code] = r.signature()
        elif sig == "u":
            fields[code] = r.u32()
        else:
            raise BusError(f"unexpected header field type {sig!r}")
    body_at = 16 + fields_len + (-(16 + fields_len) % 8)
    return fixed[1], fields, whole[body_at : body_at + body_len]


class Connection:
    """A client connection to the system bus, for method calls that take strings."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._serial = 0

    @classmethod
    async def open(cls, address: str = SYSTEM_BUS) -> Connection:
        reader, writer = await asyncio.open_unix_connection(address)
        try:
            uid = str(os.getuid()).encode().hex()
            writer.write(b"\0AUTH EXTERNAL " + uid.encode() + b"\r\n")
            line = await reader.readline()
            if not line.startswith(b"OK "):
                raise BusError(f"the bus refused the authentication: {line!r}")
            writer.write(b"BEGIN\r\n")
            conn = cls(reader, writer)
            await conn.call(
                "/org/freedesktop/DBus", "org.freedesktop.DBus", "Hello", "org.freedesktop.DBus"
            )
        except BaseException:
            writer.close()
            raise
        return conn

    def close(self) -> None:
        self._writer.close()

    async def call(
        self, path: str, interface: str, member: str, destination: str, *args: str
    ) -> tuple[str, bytes]:
        """The reply's signature and body (raises :class:`BusError` for an error reply)."""
        self._serial += 1
        serial = self._serial
        self._writer.write(
            method_call(
                serial,
                path=path,
                interface=interface,
                member=member,
                destination=destination,
                args=args,
            )
        )
        while True:
            kind, fields, body = await _read_message(self._reader)
            if fields.get(_REPLY_SERIAL) != serial:
                continue  # a signal (NameAcquired...), not ours
            if kind == _ERROR:
                text = _Reader(body).string() if body else ""
                raise BusError(f"{fields.get(_ERROR_NAME)}: {text}")
            if kind != _METHOD_RETURN:
                raise BusError(f"unexpected message type {kind}")
            return str(fields.get(_SIGNATURE, "")), body

    async def get_property(self, path: str, interface: str, name: str) -> tuple[str, _Reader]:
        """A property of a systemd object: the variant's signature, and a reader at its value."""
        sig, body = await self.call(
            path,
            "org.freedesktop.DBus.Properties",
            "Get",
            "org.freedesktop.systemd1",
            interface,
            name,
        )
        if sig != "v":
            raise BusError(f"Properties.Get answered {sig!r}")
        r = _Reader(body)
        return r.signature(), r


async def own_job_type(environ: Mapping[str, str] | None = None) -> str | None:
    """The type of the job systemd runs on this process's unit ("restart", "stop"...), or
    None when there is none."""
    env = os.environ if environ is None else environ
    address = env.get("DBUS_SYSTEM_BUS_ADDRESS", "")
    path = address.removeprefix("unix:path=") if address.startswith("unix:path=") else SYSTEM_BUS
    conn = await Connection.open(path)
    try:
        sig, r = await conn.get_property(
            "/org/freedesktop/systemd1/unit/self", "org.freedesktop.systemd1.Unit", "Job"
        )
        if sig != "(uo)":
            raise BusError(f"Unit.Job is {sig!r}")
        r.align(8)
        job_id = r.u32()
        job_path = r.string()
        if job_id == 0:
            return None
        sig, r = await conn.get_property(job_path, "org.freedesktop.systemd1.Job", "JobType")
        if sig != "s":
            raise BusError(f"Job.JobType is {sig!r}")
        return r.string()
    finally:
        conn.close()
