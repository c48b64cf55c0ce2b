"""Clients behind reverse proxies: ``trusted_proxies``.

A request whose peer (the TCP address that connected, or ``unix`` for a peer on a unix
socket) is in ``trusted_proxies`` has its ``request.remote``, ``request.scheme`` and
``request.host`` taken from the proxy's headers, with aio-libs' aiohttp-remotes:

- ``X-Forwarded-For`` (with ``X-Forwarded-Proto`` / ``X-Forwarded-Host``; several
  header lines are one list, as HAProxy's ``option forwardfor`` makes them):
  :class:`aiohttp_remotes.XForwardedFiltered`, which walks the list from the right past
  the trusted proxies and takes the first address that is not one;
- else ``Forwarded`` (RFC 7239): :class:`aiohttp_remotes.ForwardedRelaxed`, its last
  element (the one the trusted peer added).

A peer that is not trusted is never believed: its headers are left as they are, and
``request.remote`` is its own address. A malformed header from a trusted peer is a 400.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web
from aiohttp_remotes import ForwardedRelaxed, XForwardedFiltered
from multidict import CIMultiDict, CIMultiDictProxy

from .drain import TrackedRequestHandler

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
UNIX = "unix"


class TrustedProxies:
    def __init__(self, trusted: Sequence[str]) -> None:
        self.unix = UNIX in trusted
        self.networks: list[Network] = [
            ipaddress.ip_network(item, strict=False) for item in trusted if item != UNIX
        ]
        self._x_forwarded = XForwardedFiltered(set(self.networks))
        self._forwarded = ForwardedRelaxed(num=1)

    def trusts(self, request: web.BaseRequest) -> bool:
        transport = request.transport
        if transport is None:
            return False
        peer = transport.get_extra_info("peername")
        if not isinstance(peer, tuple):  # a unix socket's peer: '' or None
            return self.unix
        try:
            address = ipaddress.ip_address(peer[0])
        except ValueError:
            return False
        return any(address in net for net in self.networks)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self.trusts(request):
            return await handler(request)
        handler = _telling(request, handler)
        headers = request.headers
        if "X-Forwarded-For" in headers:
            if len(hops := headers.getall("X-Forwarded-For")) > 1:
                # one list in several header lines (HAProxy adds a line of its own):
                # the same as one line, comma-separated (RFC 9110, 5.3)
                merged = CIMultiDict(headers)
                merged["X-Forwarded-For"] = ", ".join(hops)
                request = request.clone(headers=CIMultiDictProxy(merged))
            return await self._x_forwarded.middleware(request, handler)
        if "Forwarded" in request.headers:
            return await self._forwarded.middleware(request, handler)
        return await handler(request)


def _telling(request: web.Request, handler: Handler) -> Handler:
    """``handler``, telling the connection which client the proxy's headers named (the
    access log, which sees the request before this middleware, logs that one)."""
    proto = request.protocol

    async def tell(resolved: web.Request) -> web.StreamResponse:
        if isinstance(proto, TrackedRequestHandler):
            proto.client = resolved.remote
        return await handler(resolved)

    return tell


def install(app: web.Application, trusted: Sequence[str]) -> None:
    """Outermost: every other middleware sees the client (and the access log logs it)."""
    app.middlewares.insert(0, TrustedProxies(trusted).middleware)
