"""Binding listening sockets when sdserve is not socket-activated (a laptop, a container)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import socket
import stat
from dataclasses import dataclass

from .activation import Listener

log = logging.getLogger("sdserve.binding")


class BindError(Exception):
    """An address cannot be parsed or bound; the message names the address."""


#: the host of an address given as a bare ``PORT`` or ``:PORT``: the default's
DEFAULT_HOST = "127.0.0.1"


@dataclass(frozen=True)
class Address:
    """A parsed address; ``family`` is ``AF_UNSPEC`` for a host name (resolved at bind)."""

    family: socket.AddressFamily
    host: str
    port: int
    path: str

    def __str__(self) -> str:
        if self.family == socket.AF_UNIX:
            return f"unix:{self.path}"
        if self.family == socket.AF_INET6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """Parse ``HOST:PORT``, ``[V6ADDR]:PORT``, ``PORT`` / ``:PORT`` (127.0.0.1, like the
    default ``127.0.0.1:8080``), ``unix:PATH``. ``HOST`` is an IPv4 address or a host name,
    which :func:`bind_addresses` resolves (every address it resolves to is bound)."""
    spec = text.strip()
    if spec.startswith("unix:"):
        path = spec[5:]
        if not path:
            raise BindError(f"{text!r}: a unix address needs a path (unix:/run/app.sock)")
        return Address(socket.AF_UNIX, "", 0, path)
    if spec.startswith("["):
        host, sep, rest = spec[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise BindError(f"{text!r}: expected [IPV6]:PORT")
        port_text = rest[1:]
        family = socket.AF_INET6
    else:
        host, _, port_text = spec.rpartition(":")
        family = socket.AF_INET
        if ":" in host:
            raise BindError(f"{text!r}: put an IPv6 address in brackets, e.g. [::1]:8080")
        host = host or DEFAULT_HOST
    try:
        port = int(port_text)
    except ValueError:
        raise BindError(f"{text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise BindError(f"{text!r}: port {port} is out of range")
    try:
        socket.inet_pton(family, host)
    except OSError:
        # a last label of digits only is an IPv4 address inet_pton refuses ("10.1"), which
        # getaddrinfo would read as inet_aton does (10.0.0.1): neither is a name
        numeric = host.rstrip(".").rpartition(".")[2].isdigit()
        if family == socket.AF_INET6 or numeric or not _HOST_NAME.fullmatch(host):
            what = "an IPv6 address" if family == socket.AF_INET6 else "an IP address or host name"
            raise BindError(f"{text!r}: {host!r} is not {what}") from None
        family = socket.AF_UNSPEC  # a host name: resolved when bound
    return Address(family, host, port, "")


#: a host name (RFC 1123 labels; a trailing dot allowed)
_HOST_NAME = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*\.?"
)


def resolve(addr: Address, key: str = "bind") -> list[Address]:
    """The addresses to bind for ``addr``: itself, or every address a host name resolves
    to (``localhost``: 127.0.0.1, and ::1 where the host has it), without duplicates."""
    if addr.family != socket.AF_UNSPEC:
        return [addr]
    try:
        infos = socket.getaddrinfo(
            addr.host, addr.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    except socket.gaierror as exc:
        raise BindError(
            f"{key} {addr}: the host name {addr.host!r} does not resolve ({exc.strerror})"
        ) from None
    found: list[Address] = []
    for family, _type, _proto, _name, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        host = str(sockaddr[0])
        one = Address(socket.AddressFamily(family), host, addr.port, "")
        if one not in found:
            found.append(one)
    if not found:
        raise BindError(f"{key} {addr}: {addr.host!r} resolves to no IPv4 or IPv6 address")
    return found


def _remove_stale_unix_socket(path: str) -> None:
    """Unlink a unix socket file that nobody listens on any more; leave a live one alone."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise BindError(f"unix:{path}: the path exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
    except OSError:
        return
    else:
        raise BindError(f"unix:{path}: address already in use (another process listens there)")
    finally:
        probe.close()


def _bind_one(addr: Address, name: str, backlog: int) -> Listener:
    sock = socket.socket(addr.family, socket.SOCK_STREAM)
    try:
        if addr.family == socket.AF_UNIX:
            _remove_stale_unix_socket(addr.path)
            sock.bind(addr.path)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if addr.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((addr.host, addr.port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        code = errno.errorcode.get(exc.errno or 0, "")
        reason = exc.strerror or str(exc)
        raise BindError(f"cannot bind {addr}: {reason.lower()} ({code})") from exc
    except BaseException:
        sock.close()
        raise
    return Listener(name=name, sock=sock, inherited=False)


def _close(listeners: list[Listener]) -> None:
    for listener in listeners:
        with contextlib.suppress(OSError):
            listener.sock.close()


def bind_addresses(text: str, name: str, backlog: int, *, key: str = "bind") -> list[Listener]:
    """Bind and listen on ``text``: one address, or every address a host name resolves
    to. Errors name the address (and ``key``, the setting it came from) and the reason."""
    parsed = parse_address(text)
    addrs = resolve(parsed, key)
    bound: list[Listener] = []
    absent: list[str] = []
    try:
        for addr in addrs:
            try:
                bound.append(_bind_one(addr, name, backlog))
            except BindError as exc:
                # a name may resolve to an address this host does not have (::1 from
                # /etc/hosts with IPv6 off): bound without it, if another one is bound
                cause = exc.__cause__
                if parsed.family != socket.AF_UNSPEC or not isinstance(cause, OSError):
                    raise
                if cause.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    raise
                absent.append(str(exc))
        if not bound:
            raise BindError(
                f"{key} {parsed}: none of its addresses can be bound: " + "; ".join(absent)
            )
    except BaseException:
        _close(bound)
        raise
    for problem in absent:
        log.warning("%s %s: left out, this host does not have it: %s", key, parsed, problem)
    return bound


def bind_address(text: str, name: str, backlog: int) -> Listener:
    """Bind and listen on one address; errors name the address and the reason.

    A host name must resolve to one address here; :func:`bind_addresses` binds them all."""
    addrs = resolve(parse_address(text))
    if len(addrs) > 1:
        shown = ", ".join(map(str, addrs))
        raise BindError(f"{text!r} resolves to {len(addrs)} addresses ({shown}): bind_addresses")
    return _bind_one(addrs[0], name, backlog)


#: the setting each socket name's addresses come from, for the messages
_KEYS = {"http": "bind", "admin": "admin_bind"}


def bind_all(addresses: dict[str, tuple[str, ...]], backlog: int) -> list[Listener]:
    """Bind every address of every name; on any failure close what was bound and raise."""
    bound: list[Listener] = []
    try:
        for name, texts in addresses.items():
            for text in texts:
                bound.extend(bind_addresses(text, name, backlog, key=_KEYS.get(name, name)))
    except BaseException:
        _close(bound)
        raise
    return bound
