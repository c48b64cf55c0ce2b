"""The rule between ``drain_delay`` and the health checks of a load balancer in front.

On a stop, sdserve answers ``/readyz`` with 503 and keeps serving for ``drain_delay``; then
it stops accepting. A load balancer that checks ``/readyz`` must have taken the host out of
rotation by then, or what it sends afterwards is refused (or reset, when the sockets close
with the service). It needs up to its *check window* for that: with HAProxy,
``inter`` + (``fall`` - 1) x ``fastinter`` + ``timeout check`` (``units/LOADBALANCER.md``).
So ``drain_delay`` must be longer than the window.

sdserve cannot see the load balancer's settings; it knows only its own. The config key
``lb_check_window`` tells it the window, and then a shorter ``drain_delay`` is warned about at
start. Without it, the one setting sdserve can tell is wrong is ``drain_delay = 0`` while an
admin socket serves the health endpoints: such a socket is there to be probed.
"""

from __future__ import annotations

from collections.abc import Iterable

from .config import Config

GUIDE = "units/LOADBALANCER.md"


def drain_delay_warnings(cfg: Config, sockets: Iterable[str]) -> list[str]:
    """What is wrong with ``drain_delay`` for a load balancer, given the names of the sockets
    sdserve serves (``admin`` is the admin socket); empty when nothing is."""
    if not cfg.health.enabled:
        return []  # the application serves its own readiness: sdserve cannot tell
    window = cfg.lb_check_window
    if window > 0 and cfg.drain_delay < window:
        return [
            f"drain_delay ({cfg.drain_delay:g}s) is shorter than lb_check_window ({window:g}s): "
            "on a stop, this host stops accepting before the load balancer can have seen "
            f"/readyz fail, and requests it sends meanwhile fail; set drain_delay to at least "
            f"{window:g}s (twice that for a margin; see {GUIDE})"
        ]
    probed = "admin" in set(sockets) and cfg.health.placement in ("admin", "both")
    if window == 0 and cfg.drain_delay == 0 and probed:
        return [
            "drain_delay is 0 while an admin socket serves /readyz: a load balancer that "
            "checks it cannot take this host out of rotation before it stops accepting on a "
            "stop; set drain_delay above the load balancer's check window, and "
            f"lb_check_window to have it checked (see {GUIDE})"
        ]
    return []
