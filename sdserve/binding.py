"""Binding listening sockets when sdserve is not socket-activated (a laptop, a container)."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from dataclasses import dataclass

from .activation import Listener


class BindError(Exception):
    """An address cannot be parsed or bound; the message names the address."""


@dataclass(frozen=True)
class Address:
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
    """Parse ``HOST:PORT``, ``[V6ADDR]:PORT``, ``:PORT`` / ``PORT`` (all IPv4), ``unix:PATH``."""
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
        host = host or "0.0.0.0"
    try:
        port = int(port_text)
    except ValueError:
        raise BindError(f"{text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise BindError(f"{text!r}: port {port} is out of range")
    try:
        socket.inet_pton(family, host)
    except OSError:
        raise BindError(f"{text!r}: {host!r} is not an IP address") from None
    return Address(family, host, port, "")


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


def bind_address(text: str, name: str, backlog: int) -> Listener:
    """Bind and listen on one address; errors name the address and the reason."""
    addr = parse_address(text)
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


def bind_all(addresses: dict[str, tuple[str, ...]], backlog: int) -> list[Listener]:
    """Bind every address of every name; on any failure close what was bound and raise."""
    bound: list[Listener] = []
    try:
        for name, texts in addresses.items():
            for text in texts:
                bound.append(bind_address(text, name, backlog))
    except BaseException:
        for listener in bound:
            with contextlib.suppress(OSError):
                listener.sock.close()
        raise
    return bound
