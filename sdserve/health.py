"""Health endpoints: ``/livez``, ``/readyz``, ``/startupz``."""

from __future__ import annotations

from aiohttp import web

from .config import HealthConfig
from .state import WorkerState


def install(
    app: web.Application, state: WorkerState, config: HealthConfig, *, admin: bool
) -> set[str]:
    """Add the health routes to ``app``; returns their paths (exempt from load shedding).

    ``admin`` is true for the admin socket's application, where details are shown.
    """

    async def livez(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        if state.accepting_traffic:
            return web.Response(text="ok\n")
        return web.Response(status=503, text=f"{state.phase.value}\n")

    async def startupz(request: web.Request) -> web.Response:
        if state.started:
            return web.Response(text="ok\n")
        return web.Response(status=503, text="starting\n")

    app.router.add_get(config.livez_path, livez)
    app.router.add_get(config.readyz_path, readyz)
    app.router.add_get(config.startupz_path, startupz)
    return {config.livez_path, config.readyz_path, config.startupz_path}
