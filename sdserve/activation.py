"""Socket activation: ``LISTEN_FDS`` / ``LISTEN_FDNAMES`` / ``LISTEN_PID`` to validated sockets.

The parsing follows sd_listen_fds(3) but takes the environment and the PID as
arguments, so that callers (and tests) hand them in. libsystemd's own
``listen_fds_with_names`` reads the C-level environment of the process, which
cannot be handed in; the rules are the same.

Every fd is checked before use: it must be a socket, of stream type, and
listening. Its address family is read from the fd, never assumed.

Beside the listening sockets, ``LISTEN_FDS`` may hold client connections that an
earlier instance put in systemd's fd store (named :data:`~sdserve.handover.CONN_PREFIX`
``...``, see :mod:`sdserve.handover`). :func:`activation_from_environ` returns them
apart, each checked to be a connected stream socket; one that is not is closed and
reported, never an error of the start.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import resource
import socket
import stat
from collections.abc import MutableMapping
from dataclasses import dataclass, field

from .handover import is_connection_name

log = logging.getLogger("sdserve.activation")

SD_LISTEN_FDS_START = 3
_SUPPORTED_FAMILIES = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6", socket.AF_UNIX: "unix"}


class ActivationError(Exception):
    """The sockets handed over by systemd (or a launcher) cannot be used."""


@dataclass(frozen=True)
class Listener:
    """A listening stream socket, with the name systemd gave it (``FileDescriptorName=``)."""

    name: str
    sock: socket.socket
    inherited: bool

    @property
    def fd(self) -> int:
        return self.sock.fileno()

    @property
    def address(self) -> str:
        return describe_address(self.sock)


def describe_address(sock: socket.socket) -> str:
    """A human-readable address: ``127.0.0.1:8080``, ``[::1]:8080`` or ``unix:/run/x.sock``."""
    addr = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        if isinstance(addr, bytes):  # abstract namespace
            return "unix:@" + addr[1:].decode(errors="replace")
        return f"unix:{addr or '(unnamed)'}"
    if sock.family == socket.AF_INET6:
        return f"[{addr[0]}]:{addr[1]}"
    return f"{addr[0]}:{addr[1]}"


def _check_fd(fd: int, name: str) -> socket.socket:
    return stream_socket(fd, f"fd {fd} (name {name!r})", listening=True)


def connection_from_fd(fd: int, label: str) -> socket.socket:
    """A connected stream socket from ``fd`` (handed over by another process);
    :class:`ActivationError` naming ``label`` otherwise, with the fd left open."""
    return stream_socket(fd, label, listening=False)


def stream_socket(fd: int, label: str, *, listening: bool) -> socket.socket:
    """``fd`` as a stream socket of a supported family, listening or connected as asked,
    close-on-exec; :class:`ActivationError` naming ``label`` otherwise (the fd is left as
    it was found)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise ActivationError(f"{label} is not open: {exc.strerror}") from exc
    if not stat.S_ISSOCK(mode):
        raise ActivationError(f"{label} is not a socket")
    sock = socket.socket(fileno=fd)  # family, type and protocol are read from the fd
    try:
        if sock.family not in _SUPPORTED_FAMILIES:
            raise ActivationError(
                f"{label} has address family {sock.family!r}; "
                "sdserve serves IPv4, IPv6 and unix sockets"
            )
        if sock.type != socket.SOCK_STREAM:
            raise ActivationError(
                f"{label} is a {sock.type.name} socket; sdserve serves stream sockets"
            )
        accepting = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        if listening and not accepting:
            raise ActivationError(
                f"{label} is a stream socket but is not listening (listen() was not called)"
            )
        if not listening and accepting:
            raise ActivationError(f"{label} is a listening socket, not a connection")
        if not listening:
            try:
                sock.getpeername()
            except OSError as exc:
                raise ActivationError(f"{label} is not connected: {exc.strerror}") from exc
    except BaseException:
        sock.detach()  # leave the fd as we found it
        raise
    # fds are handed over without close-on-exec; keep them out of the app's children.
    flags = fcntl.fcntl(fd, fcntl.F_GETFD)
    fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
    return sock


@dataclass
class Activated:
    """What systemd passed: the listening sockets, and connections from its fd store."""

    listeners: list[Listener]
    #: (FDNAME, connected socket) of each stored connection that can be served
    connections: list[tuple[str, socket.socket]] = field(default_factory=list)
    #: stored fds that could not be served (closed): "NAME: why"
    refused: list[str] = field(default_factory=list)


def listeners_from_environ(
    environ: MutableMapping[str, str], pid: int, *, unset: bool = True
) -> list[Listener] | None:
    """The listening sockets passed by systemd, or None when not socket-activated.

    Stored connections among them are closed: use :func:`activation_from_environ` to
    serve them."""
    activated = activation_from_environ(environ, pid, unset=unset)
    if activated is None:
        return None
    for _name, sock in activated.connections:
        sock.close()
    return activated.listeners


def activation_from_environ(
    environ: MutableMapping[str, str], pid: int, *, unset: bool = True
) -> Activated | None:
    """The sockets passed by systemd, or None when this process was not socket-activated.

    A ``LISTEN_PID`` that names another process is ignored with a warning (the
    variables were inherited from a parent), unless ``NOTIFY_SOCKET`` says systemd
    started this service: then it is an error. With ``unset``, the ``LISTEN_*``
    variables are removed from ``environ`` once read, so children do not see them.
    """
    if "LISTEN_FDS" not in environ:
        return None
    pid_text = environ.get("LISTEN_PID", "")
    fds_text = environ.get("LISTEN_FDS", "")
    names_text = environ.get("LISTEN_FDNAMES")
    if unset:
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            environ.pop(var, None)
    if pid_text != str(pid):
        if environ.get("NOTIFY_SOCKET"):
            # under systemd the sockets are this service's: binding others instead would
            # serve on the wrong address, or fail on the one systemd holds
            raise ActivationError(
                f"LISTEN_PID={pid_text or '(unset)'} is not this process (pid {pid}), but "
                "NOTIFY_SOCKET says systemd started this service: something between systemd "
                "and sdserve forked (a wrapper script without exec?); start sdserve itself, "
                "or exec it"
            )
        log.warning(
            "ignoring LISTEN_FDS=%s: LISTEN_PID=%s is not this process (pid %d)",
            fds_text,
            pid_text or "(unset)",
            pid,
            extra={"SDSERVE_PHASE": "sockets"},
        )
        return None
    if not fds_text.isascii() or not fds_text.isdigit():  # int() takes "1_0" and " 1"
        raise ActivationError(f"LISTEN_FDS={fds_text!r} is not a number")
    count = int(fds_text)
    if count < 1:
        raise ActivationError(f"LISTEN_FDS={count}: no sockets were passed")
    most = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - SD_LISTEN_FDS_START
    if count > most:
        raise ActivationError(
            f"LISTEN_FDS={fds_text}: more sockets than this process may have open "
            f"({most}, from its RLIMIT_NOFILE)"
        )
    names = names_text.split(":") if names_text is not None else ["unknown"] * count
    if len(names) != count:
        raise ActivationError(
            f"LISTEN_FDNAMES has {len(names)} name(s) ({names_text!r}) but LISTEN_FDS={count}"
        )
    activated = Activated(listeners=[])
    for index, name in enumerate(names):
        fd = SD_LISTEN_FDS_START + index
        if not is_connection_name(name):
            activated.listeners.append(
                Listener(name=name, sock=_check_fd(fd, name), inherited=True)
            )
            continue
        try:
            activated.connections.append((name, connection_from_fd(fd, f"fd {fd} ({name})")))
        except ActivationError as exc:
            activated.refused.append(str(exc))
            with contextlib.suppress(OSError):
                os.close(fd)
    if not activated.listeners:
        for _name, sock in activated.connections:
            sock.close()
        raise ActivationError(
            f"LISTEN_FDNAMES={names_text!r}: no listening socket among the {count} fd(s), "
            "only stored connections"
        )
    return activated


def listeners_from_fds(fds: dict[int, str]) -> list[Listener]:
    """Validated listeners for fds handed over by sdserve's own supervisor."""
    return [Listener(name=n, sock=_check_fd(fd, n), inherited=True) for fd, n in fds.items()]
