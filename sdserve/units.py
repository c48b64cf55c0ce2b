"""``sdserve units``: render systemd units (socket, service, hardening) for one application.

Everything is rendered by pure functions from a :class:`UnitSpec`; :func:`run` only parses
the command line and writes the files. The units in the repository's ``units/`` folder are
:func:`shipped_units`, which the tests compare with the files.

Deadlines nest from the outside in. sdserve's own stop budget
(:attr:`sdserve.config.Config.stop_budget`: drain delay + shutdown timeout + cleanup) must
end before systemd's ``TimeoutStopSec=`` sends SIGKILL, and its start timeout before
``TimeoutStartSec=``; :func:`timeout_stop_sec` and :func:`timeout_start_sec` are the one place
where that rule is written.

Reloading is the same on every systemd version: ``Type=notify`` with
``ExecReload=sdserve reload $MAINPID``, which asks the service for a reload on its control
socket and waits for the outcome, so ``systemctl reload`` fails when the reload failed (with
``Type=notify-reload`` systemd could only send the signal and wait for ``READY=1``, which
comes after a failed reload too). The service sends ``RELOADING=1`` and ``EXTEND_TIMEOUT_USEC=``
while it reloads, so a slow warm-up of many workers never hits ``TimeoutStartSec=``.

Restarts, however rapid, never close the port: ``StartLimitIntervalSec=0`` turns off
systemd's start rate limit, whose hit (5 starts in 10 s by default, manual restarts
included) fails the socket unit too and closes the listening socket. Crash loops are paced
by ``RestartSec=`` instead (a start job waits out the holdoff of an automatic restart), and
by sdserve's own crash policy inside the service.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sdserve.config import Config, ConfigError, load_config

#: seconds between the end of sdserve's stop budget and systemd's SIGKILL
STOP_MARGIN = 5.0
#: connections systemd keeps for the service across a restart (its fd store), and the
#: service's fd limit, which must hold them, its listening sockets and its own work
FD_STORE_MAX = 4096
LIMIT_NOFILE = 16384
#: seconds for the interpreter to start and import the application before the checks run
START_MARGIN = 10.0
#: where a Debian package puts the command
EXECUTABLE = "/usr/bin/sdserve"
DEFAULT_WATCHDOG = 15.0
#: loopback only: opening a port to the network is the operator's decision
DEFAULT_LISTEN = ("127.0.0.1:8080",)
DEFAULT_BACKLOG = 4096

_DEFAULTS = Config()
_NAME = re.compile(r"^[A-Za-z0-9_.:-]+@?$")

# Hardening that the demo and the system tests run under. Each line is what
# `systemd-analyze security` asks for, except the network (a server needs it) and
# IPAddressDeny= (needs cgroup BPF, and the addresses belong to the operator).
HARDENING = """\
DynamicUser={dynamic_user}
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateUsers=yes
PrivateIPC=yes
DevicePolicy=closed
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
ProtectClock=yes
ProtectControlGroups=yes
ProtectHostname=yes
ProtectKernelLogs=yes
ProtectKernelModules=yes
ProtectKernelTunables=yes
ProtectProc=invisible
ProcSubset=pid
RemoveIPC=yes
KeyringMode=private
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
# new workers warm up at a lower CPU priority and return to it once ready (warmup_nice)
SystemCallFilter=setpriority
SystemCallErrorNumber=EPERM
UMask=0077
"""


class UnitError(ValueError):
    """The settings cannot make a consistent set of units."""


@dataclass(frozen=True)
class UnitSpec:
    """What the units of one application are made of.

    ``app`` is ``MODULE:FACTORY``; without it the service reads ``config`` (by default
    ``/etc/sdserve/NAME.toml``), which must name the app. A ``name`` ending in ``@`` renders
    templates, where ``%i`` (the instance) names the config file and the socket.
    """

    name: str = "sdserve"
    app: str | None = None
    config: str | None = None
    listen: tuple[str, ...] = DEFAULT_LISTEN
    admin_listen: tuple[str, ...] = ()
    user: str | None = None
    environment_file: str | None = None
    #: worker processes; None leaves sdserve's own default (one per CPU)
    workers: int | None = None
    shutdown_timeout: float = _DEFAULTS.shutdown_timeout
    start_timeout: float = _DEFAULTS.start_timeout
    drain_delay: float = _DEFAULTS.drain_delay
    watchdog: float = DEFAULT_WATCHDOG
    backlog: int = DEFAULT_BACKLOG
    executable: str = EXECUTABLE

    @property
    def template(self) -> bool:
        return self.name.endswith("@")

    def unit(self, suffix: str) -> str:
        return f"{self.name}.{suffix}"

    def sibling(self, stem_suffix: str, suffix: str) -> str:
        """``NAME-admin.socket`` or, for templates, ``NAME-admin@.socket``."""
        base = self.name.rstrip("@")
        return f"{base}{stem_suffix}{'@' if self.template else ''}.{suffix}"

    def ref(self, unit: str) -> str:
        """A reference from one unit of the set to another (templates point at ``%i``)."""
        return unit.replace("@.", "@%i.") if self.template else unit


def daemon_config(spec: UnitSpec) -> Config:
    """sdserve's configuration for these settings, validated by sdserve's own rules."""
    overrides: dict[str, object] = {
        "shutdown_timeout": spec.shutdown_timeout,
        "start_timeout": spec.start_timeout,
        "drain_delay": spec.drain_delay,
    }
    if spec.workers is not None:
        overrides["workers"] = spec.workers
    if spec.app is not None:
        overrides["app"] = spec.app
    try:
        return load_config(environ={}, overrides=overrides)
    except ConfigError as exc:
        raise UnitError(str(exc)) from exc


def timeout_stop_sec(cfg: Config) -> int:
    """systemd's ``TimeoutStopSec=``: sdserve's whole stop budget plus :data:`STOP_MARGIN`."""
    return math.ceil(cfg.stop_budget + STOP_MARGIN)


def timeout_start_sec(cfg: Config) -> int:
    """systemd's ``TimeoutStartSec=``: sdserve's start timeout plus :data:`START_MARGIN`."""
    return math.ceil(cfg.start_timeout + START_MARGIN)


def listen_stream(addr: str) -> str:
    """An sdserve address (``PORT``, ``HOST:PORT``, ``[V6]:PORT``, ``unix:PATH``, ``/PATH``)
    as a ``ListenStream=`` value."""
    addr = addr.strip()
    if addr.startswith("unix:"):
        addr = addr[len("unix:") :]
    if addr.startswith("/"):
        if any(c.isspace() for c in addr):
            raise UnitError(f"listen address {addr!r}: a socket path cannot hold spaces")
        return addr
    host, sep, port = addr.rpartition(":")
    if not sep:
        host, port = "", addr
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UnitError(f"listen address {addr!r}: expected PORT, HOST:PORT, [V6]:PORT or a path")
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        raise UnitError(f"listen address {addr!r}: write IPv6 addresses as [ADDR]:PORT")
    return f"{host}:{port}" if host else port


def _seconds(value: float) -> str:
    return f"{value:g}s" if value != int(value) else f"{int(value)}s"


def _quote_arg(arg: str) -> str:
    """One argument of an ``Exec*=`` line (systemd's quoting; ``%`` and ``$`` escaped)."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if arg and not re.search(r"[\s\"'\\;]", arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def exec_start(spec: UnitSpec, cfg: Config) -> str:
    args = [spec.executable, "run"]
    if spec.app is not None:
        args.append(spec.app)
    words = [_quote_arg(a) for a in args]
    if spec.app is None:
        config = spec.config or (
            "/etc/sdserve/%i.toml" if spec.template else f"/etc/sdserve/{spec.name}.toml"
        )
        words += ["--config", config]  # may hold %i: not escaped
    elif spec.config is not None:
        words += ["--config", _quote_arg(spec.config)]
    # The deadlines are passed on the command line so that they always agree with the
    # timeouts of this unit: a flag wins over the config file and the environment.
    if spec.workers is not None:
        words += ["--workers", str(cfg.workers)]
    words += [
        "--start-timeout",
        f"{cfg.start_timeout:g}",
        "--drain-delay",
        f"{cfg.drain_delay:g}",
        "--shutdown-timeout",
        f"{cfg.shutdown_timeout:g}",
        # systemd before 254 does not tell the service its FileDescriptorStoreMax=
        "--fd-store-max",
        str(FD_STORE_MAX),
    ]
    return " ".join(words)


def render_socket(
    spec: UnitSpec, *, fd_name: str, addresses: Sequence[str], description: str
) -> str:
    lines = [
        "[Unit]",
        f"Description={description}",
        "",
        "[Socket]",
        *(f"ListenStream={listen_stream(a)}" for a in addresses),
        f"FileDescriptorName={fd_name}",
        f"Backlog={spec.backlog}",
        # Connections accepted from these sockets inherit TCP_NODELAY.
        "NoDelay=yes",
    ]
    if any(listen_stream(a).startswith("/") for a in addresses):
        lines += ["SocketMode=0660", "RemoveOnStop=yes"]
    service = spec.unit("service")
    if fd_name != "http":
        lines.append(f"Service={spec.ref(service)}")
    lines += ["", "[Install]", "WantedBy=sockets.target", ""]
    return "\n".join(lines)


def render_service(spec: UnitSpec) -> str:
    cfg = daemon_config(spec)
    what = "%i" if spec.template else (spec.app or spec.name)
    sockets = [spec.ref(spec.unit("socket"))]
    if spec.admin_listen:
        sockets.append(spec.ref(spec.sibling("-admin", "socket")))
    env_file = spec.environment_file
    if env_file is None:
        env_file = "-/etc/default/" + (
            f"{spec.name.rstrip('@')}-%i" if spec.template else spec.name
        )
    lines = [
        "[Unit]",
        f"Description=sdserve: {what}",
        f"Requires={sockets[0]}",
        f"After={' '.join(sockets)}",
        "# no start rate limit: its hit would fail the socket too and close the port; crash",
        "# loops are paced by RestartSec= and by sdserve's own crash policy instead",
        "StartLimitIntervalSec=0",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"Sockets={' '.join(sockets)}",
        f"ExecStart={exec_start(spec, cfg)}",
        "# waits for the outcome: `systemctl reload` fails when the reload failed",
        f"ExecReload={_quote_arg(spec.executable)} reload $MAINPID",
        "# tells sdserve whether this stop is part of a restart (it then hands idle",
        "# connections to the fd store); as root (+): the bus refuses a DynamicUser",
        f"ExecStop=+{_quote_arg(spec.executable)} stopping $MAINPID",
        f"EnvironmentFile={env_file}",
        f"SyslogIdentifier={spec.name.rstrip('@')}{'-%i' if spec.template else ''}",
        # SIGTERM to the main process only: sdserve drains its workers itself; whatever is left
        # when TimeoutStopSec runs out is killed as a group.
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        "Restart=on-failure",
        "RestartSec=1s",
        f"TimeoutStartSec={timeout_start_sec(cfg)}",
        f"# sdserve's stop budget is {cfg.stop_budget:g} s (drain delay + shutdown + cleanup)",
        f"TimeoutStopSec={timeout_stop_sec(cfg)}",
        f"WatchdogSec={_seconds(spec.watchdog)}",
        "# idle keep-alive connections wait here across a restart (sdserve hands them over);",
        "# the service may hold them all and its own sockets within LimitNOFILE",
        f"FileDescriptorStoreMax={FD_STORE_MAX}",
        f"LimitNOFILE={LIMIT_NOFILE}",
        # lets a worker return from its warm-up priority to nice 0 (sdserve's warmup_nice)
        "LimitNICE=+0",
        "",
    ]
    dynamic = spec.user is None
    if not dynamic:
        lines += [f"User={spec.user}", f"Group={spec.user}"]
    lines += HARDENING.format(dynamic_user="yes" if dynamic else "no").splitlines()
    lines += ["", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)


def render_sysusers(spec: UnitSpec) -> str:
    assert spec.user is not None
    # GECOS may not hold ':'
    return f'u {spec.user} - "sdserve service {spec.name.rstrip("@")}" - -\n'


def render_units(spec: UnitSpec) -> dict[str, str]:
    """Every file for ``spec``, keyed by its path relative to the unit folder."""
    if not _NAME.match(spec.name) or "@" in spec.name[:-1]:
        raise UnitError(f"unit name {spec.name!r}: letters, digits, '_.:-' (and a final '@')")
    if not spec.listen:
        raise UnitError("at least one --listen address is needed")
    if spec.watchdog <= 0:
        raise UnitError(f"--watchdog must be positive, got {spec.watchdog}")
    if spec.user is not None and not re.match(r"^[a-z_][a-z0-9_-]*$", spec.user):
        raise UnitError(f"--user {spec.user!r}: not a valid user name")
    what = "%i" if spec.template else spec.name
    files = {
        spec.unit("socket"): render_socket(
            spec,
            fd_name="http",
            addresses=spec.listen,
            description=f"sdserve: HTTP socket of {what}",
        ),
        spec.unit("service"): render_service(spec),
    }
    if spec.admin_listen:
        files[spec.sibling("-admin", "socket")] = render_socket(
            spec,
            fd_name="admin",
            addresses=spec.admin_listen,
            description=f"sdserve: admin socket of {what}",
        )
    if spec.user is not None:
        files[f"sysusers.d/{spec.name.rstrip('@')}.conf"] = render_sysusers(spec)
    return files


def shipped_units() -> dict[str, str]:
    """The contents of the repository's ``units/`` folder.

    The admin socket is optional there: the service does not list it in ``Sockets=`` (which
    would start it with the service), but it names the service, so once it is enabled its
    descriptor is passed too (after a restart of the service).
    """
    spec = UnitSpec()
    files = render_units(spec)
    files[spec.sibling("-admin", "socket")] = render_socket(
        spec,
        fd_name="admin",
        addresses=("127.0.0.1:8081",),
        description=f"sdserve: admin socket of {spec.name}",
    )
    files.update(render_units(UnitSpec(name="sdserve@", listen=("/run/sdserve/%i.sock",))))
    return files


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Render systemd units (socket + hardened service) for an application."
    parser.add_argument("--name", default="sdserve", help="unit name (a final '@' makes templates)")
    parser.add_argument("--app", help="the application, MODULE:FACTORY (else from --config)")
    parser.add_argument(
        "--config", help="config file for the service (default /etc/sdserve/NAME.toml)"
    )
    parser.add_argument(
        "--listen",
        action="append",
        metavar="ADDR",
        help="PORT (every interface), HOST:PORT, [V6]:PORT or unix:PATH; repeatable "
        "(default 127.0.0.1:8080)",
    )
    parser.add_argument("--admin-listen", action="append", default=[], metavar="ADDR")
    parser.add_argument(
        "--user", help="a fixed user (with a sysusers.d entry) instead of DynamicUser"
    )
    parser.add_argument("--environment-file", help="EnvironmentFile= (default -/etc/default/NAME)")
    parser.add_argument(
        "--workers", type=int, help="worker processes (default: sdserve's); 0: the main process"
    )
    parser.add_argument("--shutdown-timeout", type=float, default=_DEFAULTS.shutdown_timeout)
    parser.add_argument("--start-timeout", type=float, default=_DEFAULTS.start_timeout)
    parser.add_argument("--drain-delay", type=float, default=_DEFAULTS.drain_delay)
    parser.add_argument("--watchdog", type=float, default=DEFAULT_WATCHDOG, help="WatchdogSec=")
    parser.add_argument("--backlog", type=int, default=DEFAULT_BACKLOG)
    parser.add_argument("--executable", default=EXECUTABLE, help="path of the sdserve command")
    parser.add_argument("--out", required=True, type=Path, help="folder to write the units to")


def spec_from_args(args: argparse.Namespace) -> UnitSpec:
    return UnitSpec(
        name=args.name,
        app=args.app,
        config=args.config,
        listen=tuple(args.listen or DEFAULT_LISTEN),
        admin_listen=tuple(args.admin_listen),
        user=args.user,
        environment_file=args.environment_file,
        workers=args.workers,
        shutdown_timeout=args.shutdown_timeout,
        start_timeout=args.start_timeout,
        drain_delay=args.drain_delay,
        watchdog=args.watchdog,
        backlog=args.backlog,
        executable=args.executable,
    )


def write_units(files: Mapping[str, str], out: Path) -> list[Path]:
    written = []
    for rel, text in files.items():
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
        written.append(dest)
    return written


def run(args: argparse.Namespace) -> int:
    try:
        files = render_units(spec_from_args(args))
    except UnitError as exc:
        print(f"sdserve units: {exc}", file=sys.stderr)
        return 2
    return write_out(files, args.out)


def write_out(files: Mapping[str, str], out: Path) -> int:
    """Write the units and print their paths; 2, with the reason, if they cannot be."""
    try:
        paths = write_units(files, out)
    except OSError as exc:
        print(f"sdserve units: cannot write {exc.filename or out}: {exc.strerror}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0
