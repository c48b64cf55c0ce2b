"""Is this stop part of a restart? And ``sdserve stopping``, which tells the service.

A stop cannot be told from a restart by its SIGTERM, yet they want different things of
idle keep-alive connections: a restart hands them to the next instance through
systemd's fd store, a plain stop drains them (the store is released at the stop,
which would close them under their clients). Only systemd's job for the unit says
which (``restart`` or ``stop``), and a ``DynamicUser=`` service cannot ask: the
system bus (dbus-daemon) drops a connection from a user it cannot resolve. So the
units run ``ExecStop=+sdserve stopping $MAINPID``: with ``+`` it runs as root, asks
systemd over D-Bus (:mod:`sdserve.sdbus`) and, when the job is a restart, sends the
service :data:`RESTART_HINT` (SIGUSR1) before systemd sends it SIGTERM. It never
fails the stop. One stop gets no hint: a restart that comes while ``ExecReload=`` runs
(systemd kills the reload and sends SIGTERM at once, without ``ExecStop=``; seen under
systemd 254). It drains as a stop.

:func:`restart_pending`, at SIGTERM, takes the first answer of: that hint; a launcher's
flag file (``_SDSERVE_RESTART_FLAG``, for launchers other than systemd); systemd's job
asked by the service itself (a service with a static ``User=`` may); else "cannot
tell", and the stop drains.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping

from . import sdbus

#: from ``sdserve stopping``: the stop that follows is part of a restart
RESTART_HINT = signal.SIGUSR1
#: a launcher other than systemd says a restart follows a stop by this file's existence
ENV_RESTART_FLAG = "_SDSERVE_RESTART_FLAG"
#: how long asking systemd about the stop may take at most
TIMEOUT = 2.0


async def restart_pending(
    environ: Mapping[str, str], *, hinted: bool = False
) -> tuple[bool | None, str]:
    """Whether the stop under way is part of a restart (None: cannot tell), and how that
    was learnt."""
    if hinted:
        return True, "systemd's job is a restart (ExecStop= said so)"
    flag = environ.get(ENV_RESTART_FLAG)
    if flag:
        return await asyncio.to_thread(os.path.exists, flag), f"the launcher's flag {flag}"
    if not environ.get("NOTIFY_SOCKET"):
        return None, "not under systemd"
    try:
        async with asyncio.timeout(TIMEOUT):
            kind = await sdbus.own_job_type(environ)
    except TimeoutError:
        return None, f"no restart hint from ExecStop=, and D-Bus did not answer in {TIMEOUT:g}s"
    except (OSError, EOFError, sdbus.BusError) as exc:
        return None, f"no restart hint from ExecStop=, and cannot ask systemd over D-Bus: {exc!r}"
    if kind is None:
        return False, "systemd: the unit has no job"
    return "restart" in kind, f"systemd: the unit's job is {kind}"


async def hand_over_on_this_stop(
    environ: Mapping[str, str], *, hinted: bool, logger: logging.Logger
) -> bool:
    """:func:`restart_pending`, with the decision and its reason in the journal: True
    only for a restart (idle connections go to the fd store); a stop, or cannot tell,
    drains."""
    restart, how = await restart_pending(environ, hinted=hinted)
    logger.info(
        "%s (%s)",
        "a restart: idle connections go to the fd store"
        if restart
        else "not a restart: idle connections are drained",
        how,
        extra={"SDSERVE_PHASE": "handover"},
    )
    return bool(restart)


# -- sdserve stopping ------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pid", type=int, help="the service's main process ($MAINPID)")


def run(args: argparse.Namespace) -> int:
    """``ExecStop=+sdserve stopping $MAINPID``: tell the service whether a restart follows.
    Always exits 0: a stop must never fail for want of a hint."""
    try:
        kind = asyncio.run(_job_type())
    except (OSError, EOFError, TimeoutError, sdbus.BusError) as exc:
        print(f"sdserve stopping: cannot read the unit's job: {exc!r}", file=sys.stderr)
        return 0
    if kind is not None and "restart" in kind:
        try:
            os.kill(args.pid, RESTART_HINT)
        except OSError as exc:
            print(f"sdserve stopping: cannot signal {args.pid}: {exc}", file=sys.stderr)
    return 0


async def _job_type() -> str | None:
    async with asyncio.timeout(TIMEOUT):
        return await sdbus.own_job_type()
