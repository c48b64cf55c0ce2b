"""Command-line front end; the only place that configures logging.

``sdserve run``, ``sdserve config``, ``sdserve check``, ``sdserve units`` and
``sdserve drill``. Configuration flags are generated from :class:`Config`, so every
top-level key has a flag of the same name (``shutdown_timeout`` is
``--shutdown-timeout``), and a flag given on the command line wins over the
environment and the file.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import importlib
import logging
import os
import sys
import threading
import typing
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__, reference
from .activation import Activated, ActivationError, activation_from_environ
from .binding import BindError, bind_all
from .config import Config, ConfigError, Number, config_from_json, dump_toml, load_config
from .exitcodes import ExitCode
from .handover import store_capacity
from .log import configure_logging, stop_logging
from .notify import Notifier
from .probes import start_probes
from .reaper import reaping, stop_signals_before_serving, wants_reaping

# aiohttp and what imports it (checks, worker, supervisor) are imported once the sockets
# are taken and the admin socket answers: importing them takes a few hundred milliseconds

log = logging.getLogger("sdserve")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    app_help = reference.flag_help("app", default=False) + " (or app in the config file)"
    parser.add_argument("app", nargs="?", help=app_help)
    parser.add_argument("-c", "--config", type=Path, help="TOML configuration file")
    hints = typing.get_type_hints(Config)
    group = parser.add_argument_group(
        "configuration (each flag overrides the key of that name; "
        "every key: sdserve config --help-keys)"
    )
    for f in dataclasses.fields(Config):
        tp = hints[f.name]
        if not reference.has_flag(f.name, tp):
            continue
        flag = reference.flag_name(f.name)
        help_text = reference.flag_help(f.name)
        if typing.get_origin(tp) is tuple:
            group.add_argument(
                flag,
                dest=f.name,
                action="append",
                default=argparse.SUPPRESS,
                metavar="ADDRESS",
                help=help_text + " (repeatable: the flags replace the default)",
            )
        elif tp is bool:
            group.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        elif typing.get_origin(tp) is typing.Literal:
            group.add_argument(
                flag,
                dest=f.name,
                choices=typing.get_args(tp),
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            metavar = {int: "N", float: "DURATION", Number: "NUMBER"}.get(tp, "TEXT")
            group.add_argument(
                flag, dest=f.name, default=argparse.SUPPRESS, metavar=metavar, help=help_text
            )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(Config)}
    values = {k: v for k, v in vars(args).items() if k in names and k != "app"}
    if args.app:
        values["app"] = args.app
    return values


def _load(args: argparse.Namespace) -> Config:
    # the [checks.NAME] tables are checked with the rest: every problem of the file at once
    from .checks import table_problems

    return load_config(
        toml_path=args.config, overrides=_overrides(args), check_tables=table_problems
    )


def _load_light(args: argparse.Namespace) -> Config:
    """The configuration without its [checks.NAME] tables checked (that imports the
    checks, and asyncio): enough to take the sockets and answer the admin socket. When it
    has problems, every problem is listed, the tables' included."""
    try:
        return load_config(toml_path=args.config, overrides=_overrides(args))
    except ConfigError:
        _load(args)
        raise


def take_sockets(cfg: Config, whole: Callable[[], Config]) -> tuple[Config, Activated]:
    """The sockets from systemd when socket-activated (and the connections in its fd store),
    else the configured addresses bound here, once the whole configuration is checked
    (``whole``: nothing is bound for a configuration that cannot start)."""
    activated = activation_from_environ(os.environ, os.getpid())
    if activated is not None:
        return cfg, activated
    cfg = whole()
    if not cfg.bind:
        raise BindError("bind: no address to bind (give --bind, or let systemd pass the sockets)")
    names = {"http": cfg.bind}
    if cfg.admin_bind:
        names["admin"] = cfg.admin_bind
    return cfg, Activated(listeners=bind_all(names, cfg.backlog))


def cmd_run(args: argparse.Namespace) -> int:
    stop_signals_before_serving()  # as PID 1, a stop signal without a handler is lost
    cfg = _load_light(args)
    if not cfg.app:
        raise ConfigError(
            [
                "app: no application given "
                "(sdserve run MODULE:FACTORY, or app = ... in the config file)"
            ]
        )
    configure_logging(cfg.log, cfg.log_level)
    notifier = Notifier()
    try:
        cfg, activated = take_sockets(cfg, lambda: _load(args))
    except (ActivationError, BindError) as exc:
        log.error("%s", exc, extra={"SDSERVE_PHASE": "sockets"})
        notifier.status(f"start failed: {exc}")
        return ExitCode.CONFIG
    listeners, connections = activated.listeners, activated.connections
    # the admin socket answers from now on (503 naming what the start waits for)
    probes = start_probes(listeners, cfg.health)
    # the first line of a start that got its sockets (a failure before is its one line)
    log.info(
        "sdserve %s (Python %s) starting %s",
        __version__,
        ".".join(map(str, sys.version_info[:3])),
        cfg.app,
        extra={"SDSERVE_PHASE": "start", "SDSERVE_VERSION": __version__},
    )
    if listeners[0].inherited:
        # the sockets came from systemd: the admin socket answers before this
        cfg = _load(args)
    from .checks import run_bounded
    from .worker import serve_in_process

    store = store_capacity(os.environ, cfg.fd_store_max) if cfg.handover else 0
    describe_handover(cfg, store, activated)
    warn_drain_delay(cfg, [ls.name for ls in listeners])
    log.info(
        "sockets %s: %s",
        "taken from systemd" if listeners[0].inherited else "bound",
        ", ".join(f"{ls.name}={ls.address} (fd {ls.fd})" for ls in listeners),
        extra={
            "SDSERVE_PHASE": "sockets",
            "SDSERVE_SOCKETS": ",".join(ls.name for ls in listeners),
        },
    )
    if cfg.workers == 0:
        if cfg.max_requests:
            log.warning("max_requests is ignored without workers (workers = 0)")
        # a check run that ignores cancellation must not keep the process from exiting
        serving = serve_in_process(
            cfg, listeners, notifier, connections=connections, store_capacity=store, probes=probes
        )
        from .loops import factory

        loop = cfg.loop
        if loop != "asyncio" and wants_reaping(cfg.reap_orphans):
            # uvloop keeps SIGCHLD to itself, and the reaper needs it (workers >= 1 reap in
            # the supervisor, which runs on asyncio, and serve on uvloop)
            if loop == "uvloop":
                log.warning(
                    "loop = uvloop: serving on asyncio instead, since this single process "
                    "reaps orphans (reap_orphans, as PID 1) and uvloop keeps SIGCHLD to "
                    "itself; workers >= 1 serve on uvloop and reap in the supervisor"
                )
            loop = "asyncio"
        return run_bounded(
            _reaping(cfg, serving), grace=cfg.cleanup_timeout, loop_factory=factory(loop)
        )
    from .supervisor import supervise

    # a reload reads every layer again: the same file, environment and flags
    return supervise(
        cfg,
        listeners,
        notifier,
        lambda: _load(args),
        connections=[(name, sock.detach()) for name, sock in connections],
        store_capacity=store,
        probes=probes,
    )


async def _reaping(cfg: Config, serving: Coroutine[Any, Any, int]) -> int:
    """``serving``, reaping orphans meanwhile if ``reap_orphans`` asks for it."""
    with reaping(cfg.reap_orphans):
        return await serving


def warn_drain_delay(cfg: Config, sockets: list[str]) -> None:
    """Said once at start: a ``drain_delay`` too short for a load balancer in front."""
    from .loadbalancer import drain_delay_warnings

    for text in drain_delay_warnings(cfg, sockets):
        log.warning("%s", text, extra={"SDSERVE_PHASE": "drain-delay"})


def describe_handover(cfg: Config, store: int, activated: Activated) -> None:
    """One journal line on what happens to idle connections on a restart."""
    for problem in activated.refused:
        log.warning(
            "a stored connection cannot be served, closed: %s",
            problem,
            extra={"SDSERVE_PHASE": "handover"},
        )
    if activated.connections:
        log.info(
            "%d connection(s) from the fd store, served once ready",
            len(activated.connections),
            extra={"SDSERVE_PHASE": "handover"},
        )
    if not cfg.handover:
        return
    if store:
        log.info(
            "restarts hand idle connections over through systemd's fd store (up to %d)",
            store,
            extra={"SDSERVE_PHASE": "handover"},
        )
    elif os.environ.get("NOTIFY_SOCKET"):
        log.info(
            "no fd store (FileDescriptorStoreMax= unset, or fd_store_max for systemd "
            "before 254): a restart closes idle connections after idle_grace",
            extra={"SDSERVE_PHASE": "handover"},
        )


def cmd_worker(args: argparse.Namespace) -> int:
    """A worker process, started by the supervisor (not for direct use).

    Its configuration is the one the supervisor validated for its generation
    (``_SDSERVE_CONFIG``): a config file that changed on disk since, or that is being
    edited, reaches workers only through a reload.
    """
    from .supervisor import ENV_CONFIG, run_worker

    handed = os.environ.pop(ENV_CONFIG, None)
    cfg = config_from_json(handed) if handed is not None else _load(args)
    configure_logging(cfg.log, cfg.log_level)

    return run_worker(cfg, Notifier())


def cmd_template(args: argparse.Namespace) -> int:
    """The supervisor's warm template (:mod:`sdserve.template`; not for direct use)."""
    from .template import run_template

    return run_template()


def cmd_config(args: argparse.Namespace) -> int:
    if args.help_keys:
        sys.stdout.write(reference.render_text())
        return 0
    sys.stdout.write(dump_toml(_load(args)))
    return 0


#: the extra of pyproject.toml that a subcommand needs, when it needs one
EXTRAS = {"drill": "drill"}

#: subcommands whose modules are imported only when that subcommand runs
LAZY_COMMANDS = {
    "check": (".checkcli", "run every dependency check once and print a table"),
    "units": (".units", "render systemd unit files for an application"),
    "k8s": (".k8s", "render Kubernetes manifests (Deployment, Service, PDB) for an application"),
    "drill": (".drill.cli", "load a service through restarts and reloads, count every failure"),
    "reload": (".control", "reload a running service and wait for the outcome (ExecReload=)"),
    "status": (".status", "show a running service: workers, generation, readiness, each check"),
    "stopping": (".intent", "tell a stopping service whether a restart follows (ExecStop=+)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdserve",
        description="Run an aiohttp application as a systemd service that never drops a request.",
    )
    parser.add_argument("--version", action="version", version=f"sdserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="serve an application")
    _add_config_flags(run)
    run.set_defaults(func=cmd_run)
    config = sub.add_parser("config", help="print the effective configuration as TOML")
    config.add_argument(
        "--help-keys",
        action="store_true",
        help="print every configuration key (type, default, flag, environment variable, "
        "meaning) instead, and the keys of each check type",
    )
    _add_config_flags(config)
    config.set_defaults(func=cmd_config)
    for name, (_module, text) in LAZY_COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    worker = sub.add_parser("worker")  # internal: started by the supervisor
    _add_config_flags(worker)
    worker.set_defaults(func=cmd_worker)
    template = sub.add_parser("template")  # internal: the supervisor's warm template
    template.set_defaults(func=cmd_template)
    return parser


def _lazy_command(name: str, argv: Sequence[str]) -> int:
    module, text = LAZY_COMMANDS[name]
    try:
        mod = importlib.import_module(module, __package__)
    except ModuleNotFoundError as exc:
        extra = EXTRAS.get(name)
        missing = (exc.name or "").partition(".")[0]
        if extra is None or not missing or missing == __package__:
            raise
        print(
            f"sdserve {name}: needs the {extra!r} extra ({missing} is not installed): "
            f"pip install 'sdserve[{extra}]'",
            file=sys.stderr,
        )
        return ExitCode.CONFIG
    parser = argparse.ArgumentParser(prog=f"sdserve {name}", description=text)
    mod.add_arguments(parser)
    return int(mod.run(parser.parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    try:
        if raw and raw[0] in LAZY_COMMANDS:
            return _lazy_command(raw[0], raw[1:])
        args = build_parser().parse_args(raw)
        return int(args.func(args))
    except ConfigError as exc:
        print(f"sdserve: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    finally:
        stop_logging()  # what is still queued is written (bounded: journald may be stuck)


def exit_without_teardown(code: int) -> NoReturn:
    """Exit as the interpreter would, less its teardown of every module and object.

    That teardown is the garbage collection of the whole heap on the way out: about
    100 ms for an aiohttp application on a small machine, all of it inside the gap of a
    restart (the next instance starts once this one has exited). Everything with an
    effect still happens: the application's cleanup hooks ran, the logs are written
    (``stop_logging``), non-daemon threads are waited for, ``atexit`` handlers run, and
    the standard streams are flushed.
    """
    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
