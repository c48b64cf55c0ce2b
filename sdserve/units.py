"""``sdserve units``: render systemd units (socket, service, hardening) for one application.

Everything is rendered by functions of a :class:`UnitSpec`; the only thing they read is the
config file given as ``--config``, and :func:`run` only parses the command line and writes
the files. The units in the repository's ``units/`` folder are :func:`shipped_units`, which
the tests compare with the files.

Deadlines nest from the outside in. sdserve's own stop budget
(:attr:`sdserve.config.Config.stop_budget`: drain delay + shutdown timeout + cleanup) must
end before systemd's ``TimeoutStopSec=`` sends SIGKILL, and its start timeout before
``TimeoutStartSec=``; :func:`timeout_stop_sec` and :func:`timeout_start_sec` are the one place
where that rule is written. They are applied to the configuration the service will run with:
the ``--config`` file, read when the units are rendered, so that the file stays the one
place of sdserve's settings. No setting is put on ``ExecStart=`` behind its back (a flag
there would win over the file, and ``sdserve config --config FILE`` would show values the
service does not use); the setting flags of ``sdserve units`` (``--workers``,
``--start-timeout``, ``--drain-delay``, ``--shutdown-timeout``) are for units without a
config file, and are an error next to ``--config``. After raising a deadline in the file,
render the units again.

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
by sdserve's own crash policy inside the service. A configuration error (exit status 2,
``ExitCode.CONFIG``) is not restarted at all (``RestartPreventExitStatus=2``): it would fail
the same way every second.

Where the application lives. ``--venv DIR`` runs ``DIR/bin/sdserve``; ``--workdir DIR`` is
the service's ``WorkingDirectory=`` and its ``PYTHONPATH``, so ``--app myapp:create_app``
imports ``DIR/myapp.py``. Both are read-only for the service (``ProtectSystem=strict``),
which is what a deployed application wants. ``/srv`` and ``/opt`` are the usual places. A
folder under ``/home`` or ``/root`` (hidden by ``ProtectHome=``) is made visible, read-only
and alone: ``ProtectHome=tmpfs`` puts an empty folder over the homes and
``BindReadOnlyPaths=`` mounts just that folder into it, so the service still sees no other
home. A folder under ``/tmp`` or ``/var/tmp`` is refused: the service has a private ``/tmp``
(``PrivateTmp=yes``), and code in a temporary folder is cleaned away by tmpfiles anyway.

Templates (``--name NAME@``): the instance is the port by default (``NAME@8081.socket``
listens on ``127.0.0.1:8081``); ``--listen`` may place ``%i`` elsewhere (``unix:/run/NAME/%i.sock``,
or ``%i`` for the whole address), and an address without ``%i`` is refused, since every
instance would then listen on the same one. Each instance runs as a dynamic user of its
own, ``NAME-%i``: one instance cannot read another's files, signal it or use its control
socket (which answers root and the service's own user).

Secrets: ``--credential NAME:PATH`` renders ``LoadCredential=NAME:PATH``; the service reads
``$CREDENTIALS_DIRECTORY/NAME`` (``password_credential = "NAME"`` of a postgres or redis check).
A check of the config file that names a credential which no ``--credential`` provides is an
error when the units are rendered, not when the service starts.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

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
#: a template's instance is its port, on loopback
DEFAULT_TEMPLATE_LISTEN = ("127.0.0.1:%i",)
DEFAULT_BACKLOG = 4096
#: sdserve's exit status for a configuration error (worker.ExitCode.CONFIG): not restarted
CONFIG_EXIT_STATUS = 2

_DEFAULTS = Config()
_NAME = re.compile(r"^[A-Za-z0-9_.:-]+@?$")
_USER = re.compile(r"^[a-z_][a-z0-9_-]*$")
#: the start of a per-instance user name (systemd accepts upper case too)
_USER_PREFIX = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_CREDENTIAL = re.compile(r"^[A-Za-z0-9_.-]+$")
#: the folders ProtectHome= hides, and those PrivateTmp= replaces
_HOMES = ("/home", "/root", "/run/user")
_TEMPORARY = ("/tmp", "/var/tmp")
#: the instance specifiers an address of a template may hold
_INSTANCE = re.compile(r"%[iI]")

# Hardening that the demo and the system tests run under. Each line is what
# `systemd-analyze security` asks for, except the network (a server needs it) and
# IPAddressDeny= (needs cgroup BPF, and the addresses belong to the operator).
HARDENING = """\
DynamicUser={dynamic_user}
ProtectSystem=strict
ProtectHome={protect_home}
{binds}PrivateTmp=yes
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
    ``/etc/sdserve/NAME.toml``), which must name the app. A ``config`` given explicitly is
    read when the units are rendered (see the module's docstring). A ``name`` ending in
    ``@`` renders templates, where ``%i`` (the instance) names the config file and the
    socket. ``listen`` None is the default: ``127.0.0.1:8080``, or ``127.0.0.1:%i`` for a
    template. The settings ``workers`` to ``drain_delay`` are None unless given: only the
    given ones go on ``ExecStart=``, and only without ``config``.
    """

    name: str = "sdserve"
    app: str | None = None
    config: str | None = None
    listen: tuple[str, ...] | None = None
    admin_listen: tuple[str, ...] = ()
    user: str | None = None
    environment_file: str | None = None
    #: worker processes; None leaves sdserve's own default (one per CPU)
    workers: int | None = None
    shutdown_timeout: float | None = None
    start_timeout: float | None = None
    drain_delay: float | None = None
    watchdog: float = DEFAULT_WATCHDOG
    backlog: int = DEFAULT_BACKLOG
    #: the sdserve command; None: ``venv``/bin/sdserve, or :data:`EXECUTABLE`
    executable: str | None = None
    venv: str | None = None
    workdir: str | None = None
    #: ``LoadCredential=`` pairs: (name, path)
    credentials: tuple[tuple[str, str], ...] = ()
    #: ``SocketGroup=`` of the unix sockets (which are 0660)
    socket_group: str | None = None

    @property
    def template(self) -> bool:
        return self.name.endswith("@")

    @property
    def base(self) -> str:
        return self.name.rstrip("@")

    @property
    def command(self) -> str:
        """The sdserve command of ``ExecStart=``, ``ExecReload=`` and ``ExecStop=``."""
        if self.executable is not None:
            return self.executable
        if self.venv is not None:
            return str(PurePosixPath(self.venv) / "bin" / "sdserve")
        return EXECUTABLE

    @property
    def addresses(self) -> tuple[str, ...]:
        if self.listen is not None:
            return self.listen
        return DEFAULT_TEMPLATE_LISTEN if self.template else DEFAULT_LISTEN

    @property
    def given_settings(self) -> dict[str, object]:
        """The sdserve settings given to ``sdserve units`` (``--workers`` ...)."""
        given = {
            "workers": self.workers,
            "start_timeout": self.start_timeout,
            "drain_delay": self.drain_delay,
            "shutdown_timeout": self.shutdown_timeout,
        }
        return {k: v for k, v in given.items() if v is not None}

    @property
    def per_instance_config(self) -> bool:
        """A template's ``config`` that names the instance (``/etc/NAME/%i.toml``)."""
        return self.template and self.config is not None and bool(_INSTANCE.search(self.config))

    def unit(self, suffix: str) -> str:
        return f"{self.name}.{suffix}"

    def sibling(self, stem_suffix: str, suffix: str) -> str:
        """``NAME-admin.socket`` or, for templates, ``NAME-admin@.socket``."""
        return f"{self.base}{stem_suffix}{'@' if self.template else ''}.{suffix}"

    def ref(self, unit: str) -> str:
        """A reference from one unit of the set to another (templates point at ``%i``)."""
        return unit.replace("@.", "@%i.") if self.template else unit


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def daemon_config(spec: UnitSpec) -> Config:
    """sdserve's configuration for these settings, validated by sdserve's own rules: the
    ``config`` file (read now) when one is given, else the settings given to the units."""
    overrides: dict[str, object] = dict(spec.given_settings)
    if spec.config is not None and overrides:
        flags = ", ".join(_flag(k) for k in overrides)
        raise UnitError(
            f"{flags} with --config: set {' and '.join(overrides)} in {spec.config}, which the "
            "service reads (a flag on ExecStart= would silently override the file)"
        )
    if spec.app is not None:
        overrides["app"] = spec.app
    # a template's per-instance file (/etc/NAME/%i.toml) cannot be read before there is one
    path = Path(spec.config) if spec.config is not None and not spec.per_instance_config else None
    try:
        cfg = load_config(toml_path=path, environ={}, overrides=overrides)
    except ConfigError as exc:
        raise UnitError("; ".join(exc.problems)) from exc
    if path is None or spec.config is None:
        return cfg
    if spec.app is not None:
        in_file = load_config(toml_path=path, environ={}).app
        if in_file and in_file != spec.app:
            raise UnitError(
                f"--app {spec.app} differs from app = {in_file!r} in {spec.config}: "
                "give one of them"
            )
    elif not cfg.app:
        raise UnitError(f'{spec.config} sets no app: add app = "MODULE:FACTORY" or give --app')
    given = {name for name, _path in spec.credentials}
    for check, table in sorted(cfg.checks.items()):
        wanted = table.get("password_credential") if isinstance(table, Mapping) else None
        if isinstance(wanted, str) and wanted not in given:
            raise UnitError(
                f"{spec.config}: [checks.{check}] password_credential = {wanted!r}, "
                f"but no --credential {wanted}:PATH provides it"
            )
    return cfg


def timeout_stop_sec(cfg: Config) -> int:
    """systemd's ``TimeoutStopSec=``: sdserve's whole stop budget plus :data:`STOP_MARGIN`."""
    return math.ceil(cfg.stop_budget + STOP_MARGIN)


def timeout_start_sec(cfg: Config) -> int:
    """systemd's ``TimeoutStartSec=``: sdserve's start timeout plus :data:`START_MARGIN`."""
    return math.ceil(cfg.start_timeout + START_MARGIN)


def listen_stream(addr: str, *, template: bool = False) -> str:
    """An sdserve address (``PORT``, ``HOST:PORT``, ``[V6]:PORT``, ``unix:PATH``, ``/PATH``)
    as a ``ListenStream=`` value. In a template, ``%i`` or ``%I`` (the instance) may stand for
    the port, a part of the path, or the whole address."""
    addr = addr.strip()
    if "%" in addr:
        if not template:
            raise UnitError(
                f"listen address {addr!r}: only a template (--name NAME@) has an instance (%i)"
            )
        if "%" in _INSTANCE.sub("", addr):
            raise UnitError(f"listen address {addr!r}: the only specifiers allowed are %i and %I")
    if addr.startswith("unix:"):
        addr = addr[len("unix:") :]
    if addr.startswith("/"):
        if any(c.isspace() for c in addr):
            raise UnitError(f"listen address {addr!r}: a socket path cannot hold spaces")
        return addr
    if _INSTANCE.fullmatch(addr):
        return addr
    host, sep, port = addr.rpartition(":")
    if not sep:
        host, port = "", addr
    instance_port = _INSTANCE.fullmatch(port) is not None and _INSTANCE.search(host) is None
    if not instance_port and (not port.isdigit() or not 0 < int(port) < 65536):
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


def _path_value(path: str, *, template: bool = False) -> str:
    """A path as the value of a setting that expands specifiers: ``%`` escaped, except the
    instance (``%i``, ``%I``) of a template."""
    if template:
        return re.sub(r"%(?![iI])", "%%", path)
    return path.replace("%", "%%")


def _check_path(option: str, path: str, *, spaces: bool = False) -> str:
    """An absolute path the units can name as it is; UnitError otherwise. ``spaces``: it
    is an argument of ``Exec*=`` (quoted there); other settings split values at spaces."""
    if not path.startswith("/"):
        raise UnitError(f"{option} {path!r}: give an absolute path")
    if any(not c.isprintable() or (c.isspace() and not (spaces and c == " ")) for c in path):
        raise UnitError(f"{option} {path!r}: a path in this setting cannot hold spaces")
    if ".." in PurePosixPath(path).parts:
        raise UnitError(f"{option} {path!r}: give the path without '..'")
    return path


def _under(path: str, folders: Sequence[str]) -> str | None:
    pure = PurePosixPath(path)
    for folder in folders:
        if pure == PurePosixPath(folder) or pure.is_relative_to(folder):
            return folder
    return None


def readable_paths(spec: UnitSpec) -> list[tuple[str, str]]:
    """The (option, path) pairs the service must read inside its sandbox."""
    pairs = []
    if spec.workdir is not None:
        pairs.append(("--workdir", spec.workdir))
    if spec.venv is not None:
        pairs.append(("--venv", spec.venv))
    if spec.executable is not None:
        pairs.append(("--executable", spec.executable))
    if spec.config is not None:
        pairs.append(("--config", spec.config))
    return pairs


def home_binds(spec: UnitSpec) -> list[str]:
    """The paths under ``/home``, ``/root`` or ``/run/user`` that ``BindReadOnlyPaths=``
    shows through ``ProtectHome=tmpfs``; UnitError for what the sandbox cannot show."""
    binds: list[str] = []
    for option, path in readable_paths(spec):
        _check_path(option, path, spaces=option in ("--executable", "--config"))
        temporary = _under(path, _TEMPORARY)
        if temporary is not None:
            raise UnitError(
                f"{option} {path}: the service has a private {temporary} (PrivateTmp=yes), "
                "and tmpfiles cleans it: put the application under /srv or /opt"
            )
        if _under(path, _HOMES) is None:
            continue
        if option == "--executable":
            raise UnitError(
                f"--executable {path}: ProtectHome= hides it, and the venv it runs from with "
                "it: give the venv with --venv DIR instead, which the units make readable"
            )
        if " " in path:
            raise UnitError(
                f"{option} {path!r}: a path under {_under(path, _HOMES)} cannot "
                "hold spaces (BindReadOnlyPaths= makes it visible)"
            )
        binds.append(path)
    return binds


def exec_start(spec: UnitSpec) -> str:
    args = [spec.command, "run"]
    if spec.app is not None:
        args.append(spec.app)
    words = [_quote_arg(a) for a in args]
    if spec.config is not None:
        config = _quote_arg(spec.config)
        if spec.template:
            config = re.sub(r"%%([iI])", r"%\1", config)
        words += ["--config", config]
    elif spec.app is None:
        config = "/etc/sdserve/%i.toml" if spec.template else f"/etc/sdserve/{spec.name}.toml"
        words += ["--config", config]  # may hold %i: not escaped
    # Only the settings given to `sdserve units`, and only without a config file (where
    # they belong); a flag wins over the file and the environment.
    for key, value in spec.given_settings.items():
        words += [_flag(key), f"{value:g}" if isinstance(value, float) else str(value)]
    # systemd before 254 does not tell the service its FileDescriptorStoreMax=
    words += ["--fd-store-max", str(FD_STORE_MAX)]
    return " ".join(words)


def render_socket(
    spec: UnitSpec, *, fd_name: str, addresses: Sequence[str], description: str
) -> str:
    streams = [listen_stream(a, template=spec.template) for a in addresses]
    if spec.template and not any(_INSTANCE.search(s) for s in streams):
        raise UnitError(
            f"listen address {', '.join(addresses)} of the template {spec.name}: every "
            "instance would listen on it; use %i, the instance (127.0.0.1:%i: the instance "
            "is the port; unix:/run/NAME/%i.sock)"
        )
    lines = ["[Unit]", f"Description={description}", ""]
    if spec.template:
        stream = next(s for s in streams if _INSTANCE.search(s))
        instance = "8081" if re.search(r"(^|:)%[iI]$", stream) else "shop"
        lines += [
            f"# %i is the instance: `systemctl enable --now {spec.base}@{instance}.socket`",
            f"# listens on {_INSTANCE.sub(instance, stream)}",
        ]
    lines += [
        "[Socket]",
        *(f"ListenStream={s}" for s in streams),
        f"FileDescriptorName={fd_name}",
        f"Backlog={spec.backlog}",
        # Connections accepted from these sockets inherit TCP_NODELAY.
        "NoDelay=yes",
    ]
    if any(s.startswith("/") for s in streams):
        lines += ["SocketMode=0660", "RemoveOnStop=yes"]
        if spec.socket_group is not None:
            lines.append(f"SocketGroup={spec.socket_group}")
    service = spec.unit("service")
    if fd_name != "http":
        lines.append(f"Service={spec.ref(service)}")
    lines += ["", "[Install]", "WantedBy=sockets.target", ""]
    return "\n".join(lines)


def _user_lines(spec: UnitSpec) -> tuple[bool, list[str]]:
    """Whether the user is dynamic, and the ``User=`` lines."""
    if spec.user is not None:
        return False, [f"User={spec.user}", f"Group={spec.user}"]
    if spec.template:
        return True, [
            "# a dynamic user per instance: instances cannot read or signal each other, nor",
            "# use each other's control socket",
            f"User={spec.base}-%i",
        ]
    return True, []


def render_service(spec: UnitSpec) -> str:
    binds = home_binds(spec)
    cfg = daemon_config(spec)
    what = "%i" if spec.template else (spec.app or spec.name)
    sockets = [spec.ref(spec.unit("socket"))]
    if spec.admin_listen:
        sockets.append(spec.ref(spec.sibling("-admin", "socket")))
    env_file = spec.environment_file
    if env_file is None:
        env_file = "-/etc/default/" + (f"{spec.base}-%i" if spec.template else spec.name)
    command = _quote_arg(spec.command)
    where = []
    if spec.workdir is not None:
        where = [
            f"WorkingDirectory={_path_value(spec.workdir, template=spec.template)}",
            "# the application is imported from there (by the workers too)",
            f"Environment=PYTHONPATH={_path_value(spec.workdir, template=spec.template)}",
        ]
    credentials = [f"LoadCredential={n}:{_path_value(p)}" for n, p in spec.credentials]
    if credentials:
        credentials.insert(0, "# the service reads $CREDENTIALS_DIRECTORY/NAME")
    if spec.per_instance_config:
        sized = " (if an instance's config file changes it, raise it with a drop-in)"
    elif spec.config is not None:
        sized = f" (read from {spec.config}: render the units again after changing it)"
    elif spec.app is None:
        sized = " (if the config file changes it, render the units with --config)"
    else:
        sized = ""
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
        *where,
        f"ExecStart={exec_start(spec)}",
        "# waits for the outcome: `systemctl reload` fails when the reload failed",
        f"ExecReload={command} reload $MAINPID",
        "# tells sdserve whether this stop is part of a restart (it then hands idle",
        "# connections to the fd store); as root (+): the bus refuses a DynamicUser",
        f"ExecStop=+{command} stopping $MAINPID",
        f"EnvironmentFile={env_file}",
        *credentials,
        f"SyslogIdentifier={spec.base}{'-%i' if spec.template else ''}",
        # SIGTERM to the main process only: sdserve drains its workers itself; whatever is left
        # when TimeoutStopSec runs out is killed as a group.
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        "Restart=on-failure",
        "RestartSec=1s",
        "# a configuration error (exit status 2) would fail the same way again",
        f"RestartPreventExitStatus={CONFIG_EXIT_STATUS}",
        f"# sdserve's start timeout is {cfg.start_timeout:g} s{sized}",
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
    dynamic, users = _user_lines(spec)
    lines += users
    bind_lines = ""
    if binds:
        bind_lines = "# only these folders of the homes are visible (read-only)\n" + "".join(
            f"BindReadOnlyPaths={_path_value(b, template=spec.template)}\n" for b in binds
        )
    lines += HARDENING.format(
        dynamic_user="yes" if dynamic else "no",
        protect_home="tmpfs" if binds else "yes",
        binds=bind_lines,
    ).splitlines()
    lines += ["", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)


def render_sysusers(spec: UnitSpec) -> str:
    assert spec.user is not None
    # GECOS may not hold ':'
    return f'u {spec.user} - "sdserve service {spec.base}" - -\n'


def _validate(spec: UnitSpec) -> None:
    if not _NAME.match(spec.name) or "@" in spec.name[:-1]:
        raise UnitError(f"unit name {spec.name!r}: letters, digits, '_.:-' (and a final '@')")
    if not spec.addresses:
        raise UnitError("at least one --listen address is needed")
    if spec.watchdog <= 0:
        raise UnitError(f"--watchdog must be positive, got {spec.watchdog}")
    if spec.user is not None and not _USER.match(spec.user):
        raise UnitError(f"--user {spec.user!r}: not a valid user name")
    if spec.template and spec.user is None and not _USER_PREFIX.match(spec.base):
        raise UnitError(
            f"unit name {spec.name!r}: each instance runs as the dynamic user "
            f"{spec.base}-INSTANCE, which is not a valid user name; give --user"
        )
    if spec.socket_group is not None and not _USER.match(spec.socket_group):
        raise UnitError(f"--socket-group {spec.socket_group!r}: not a valid group name")
    if spec.venv is not None and spec.executable is not None:
        raise UnitError("give --venv DIR (which runs DIR/bin/sdserve) or --executable, not both")
    seen: set[str] = set()
    for name, path in spec.credentials:
        if not _CREDENTIAL.match(name) or name in (".", "..") or len(name) > 255:
            raise UnitError(
                f"--credential {name}:{path}: the name must be letters, digits and '_.-'"
            )
        if name in seen:
            raise UnitError(f"--credential {name}: given twice")
        seen.add(name)
        _check_path(f"--credential {name}:", path)


def render_units(spec: UnitSpec) -> dict[str, str]:
    """Every file for ``spec``, keyed by its path relative to the unit folder."""
    _validate(spec)
    what = "%i" if spec.template else spec.name
    files = {
        spec.unit("socket"): render_socket(
            spec,
            fd_name="http",
            addresses=spec.addresses,
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
        files[f"sysusers.d/{spec.base}.conf"] = render_sysusers(spec)
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


def _credential(text: str) -> tuple[str, str]:
    name, sep, path = text.partition(":")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME:PATH, got {text!r}")
    return name, path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Render systemd units (socket + hardened service) for an application. "
        "See units/DEPLOY.md for a walk-through."
    )
    parser.add_argument(
        "--name",
        default="sdserve",
        help="unit name; a final '@' makes templates, whose instance %%i is the port "
        "(NAME@8081.socket) unless --listen places it (default: %(default)s)",
    )
    parser.add_argument(
        "--app", help="the application, MODULE:FACTORY (default: the app of --config)"
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="sdserve's config file for the service, read now to size the unit's timeouts "
        "(default: none with --app, else /etc/sdserve/NAME.toml)",
    )
    parser.add_argument(
        "--workdir",
        metavar="DIR",
        help="WorkingDirectory= and PYTHONPATH: where --app is imported from (default: none)",
    )
    parser.add_argument(
        "--venv",
        metavar="DIR",
        help="the venv sdserve is installed in: runs DIR/bin/sdserve (default: --executable)",
    )
    parser.add_argument(
        "--executable",
        metavar="PATH",
        help=f"path of the sdserve command (default: {EXECUTABLE}, a package's)",
    )
    parser.add_argument(
        "--listen",
        action="append",
        metavar="ADDR",
        help="PORT (every interface), HOST:PORT, [V6]:PORT or unix:PATH; repeatable "
        f"(default: {DEFAULT_LISTEN[0]}; for a template "
        f"{DEFAULT_TEMPLATE_LISTEN[0].replace('%', '%%')})",
    )
    parser.add_argument(
        "--admin-listen",
        action="append",
        default=[],
        metavar="ADDR",
        help="address of the admin socket (health details); repeatable (default: none)",
    )
    parser.add_argument(
        "--credential",
        action="append",
        default=[],
        type=_credential,
        metavar="NAME:PATH",
        help="LoadCredential=NAME:PATH: the service reads $CREDENTIALS_DIRECTORY/NAME "
        "(a check's password_credential); repeatable (default: none)",
    )
    parser.add_argument(
        "--user",
        help="a fixed user (with a sysusers.d entry) instead of DynamicUser "
        "(default: a dynamic user; NAME-%%i for each instance of a template)",
    )
    parser.add_argument(
        "--socket-group",
        metavar="GROUP",
        help="SocketGroup= of unix sockets (mode 0660), e.g. a reverse proxy's (default: root)",
    )
    parser.add_argument(
        "--environment-file",
        metavar="PATH",
        help="EnvironmentFile= (default: -/etc/default/NAME)",
    )
    settings = parser.add_argument_group(
        "sdserve settings for units without --config (put them in the config file otherwise)"
    )
    settings.add_argument(
        "--workers", type=int, help="worker processes; 0: the main process (default: sdserve's)"
    )
    settings.add_argument(
        "--shutdown-timeout",
        type=float,
        metavar="SECONDS",
        help="in-flight requests get this long once the drain starts "
        f"(default: {_DEFAULTS.shutdown_timeout:g})",
    )
    settings.add_argument(
        "--start-timeout",
        type=float,
        metavar="SECONDS",
        help=f"deadline of the checks and warm-up at start (default: {_DEFAULTS.start_timeout:g})",
    )
    settings.add_argument(
        "--drain-delay",
        type=float,
        metavar="SECONDS",
        help="serve, reporting not ready, this long before the drain "
        f"(default: {_DEFAULTS.drain_delay:g})",
    )
    parser.add_argument(
        "--watchdog",
        type=float,
        default=DEFAULT_WATCHDOG,
        metavar="SECONDS",
        help="WatchdogSec= (default: %(default)g)",
    )
    parser.add_argument(
        "--backlog", type=int, default=DEFAULT_BACKLOG, help="Backlog= (default: %(default)s)"
    )
    parser.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="folder to write the units to"
    )


def spec_from_args(args: argparse.Namespace) -> UnitSpec:
    return UnitSpec(
        name=args.name,
        app=args.app,
        config=args.config,
        listen=tuple(args.listen) if args.listen else None,
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
        venv=args.venv,
        workdir=args.workdir,
        credentials=tuple(args.credential),
        socket_group=args.socket_group,
    )


def notes(spec: UnitSpec) -> list[str]:
    """What the operator should know about units that render fine."""
    found = []
    if spec.config is None and spec.app is not None:
        found.append(
            "no --config: the service runs with sdserve's defaults and the SDSERVE_* "
            "variables of EnvironmentFile=; a config file's keys and [checks] need --config"
        )
    if spec.per_instance_config:
        found.append(
            f"--config {spec.config} names the instance, so it was not read: the timeouts are "
            "sized for sdserve's defaults (raise them with a drop-in where an instance needs more)"
        )
    if spec.command != EXECUTABLE and not Path(spec.command).exists():
        found.append(f"{spec.command} does not exist (yet): the service runs it")
    if spec.workdir is not None and spec.app is not None:
        module = spec.app.partition(":")[0].split(".")[0]
        base = Path(spec.workdir)
        if base.is_dir() and not (base / module).is_dir() and not (base / f"{module}.py").exists():
            found.append(f"--app {spec.app}: {spec.workdir} holds no {module}.py or {module}/")
    return found


def write_units(files: Mapping[str, str], out: Path) -> list[Path]:
    written = []
    for rel, text in files.items():
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
        written.append(dest)
    return written


def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    try:
        files = render_units(spec)
    except UnitError as exc:
        print(f"sdserve units: {exc}", file=sys.stderr)
        return 2
    code = write_out(files, args.out)
    if code == 0:
        for note in notes(spec):
            print(f"sdserve units: note: {note}", file=sys.stderr)
    return code


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
