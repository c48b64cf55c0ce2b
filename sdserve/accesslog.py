"""Access logs and trace ids.

With ``access_log = true``, each request of the main socket is logged once it is answered
(logger ``sdserve.access``): method, path, status, duration, bytes in and out, the
client's address (the real one behind ``trusted_proxies``), the user agent, the request
id and the trace id. The lines go through sdserve's log target: in the journal each
value is a field of its own (``SDSERVE_METHOD``, ``SDSERVE_PATH``, ``SDSERVE_STATUS``,
``SDSERVE_DURATION_MS``, ``SDSERVE_BYTES_IN``, ``SDSERVE_BYTES_OUT``, ``SDSERVE_CLIENT``,
``SDSERVE_USER_AGENT``, ``SDSERVE_REQUEST_ID``, ``SDSERVE_TRACE_ID``, with
``SDSERVE_PHASE=access``); with ``access_log_format = "json"`` they are JSON lines on
stdout instead (for containers), one object per request with the same keys in lower
case.

- The health probes (and ``/metrics``) are left out unless ``access_log_probes``.
- ``access_log_sample`` logs that share of the requests (chosen at random); a 5xx is
  always logged.
- Logging never blocks the event loop: a record goes on the bounded queue of
  :mod:`sdserve.log` and a thread writes it (when the queue is full it is dropped and
  counted, ``sdserve_log_lines_dropped_total``).

Trace ids (W3C Trace Context): a valid ``traceparent`` header gives the request's trace
id; without one, a new one is generated. The application finds it in
``request["trace_id"]`` (or :func:`trace_id`); the response carries ``traceparent``
(the same trace id, with a span id of this server's) and ``X-Request-Id`` (the client's
own if it sent a sane one, else the trace id). Trace ids are on with the access log, or
alone with ``trace_ids = true``.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import random
import re
import sys
import time
from collections.abc import Awaitable, Callable
from collections.abc import Set as AbstractSet
from typing import Any

from aiohttp import web

from .log import LogQueue

log = logging.getLogger("sdserve.access")

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_REQUEST_ID = re.compile(r"^[\w.:/+=@-]{1,128}$")
_ZERO_TRACE = "0" * 32
TRACE_KEY = "trace_id"
REQUEST_ID_KEY = "request_id"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def trace_id(request: web.Request) -> str | None:
    """The request's trace id (None when trace ids are off)."""
    value = request.get(TRACE_KEY)
    return value if isinstance(value, str) else None


def parse_traceparent(value: str | None) -> str | None:
    """The trace id of a valid ``traceparent`` header, else None."""
    if not value:
        return None
    found = _TRACEPARENT.match(value.strip().lower())
    if found is None or found.group(1) == _ZERO_TRACE or value.startswith("ff"):
        return None
    return found.group(1)


class JsonLines(logging.Formatter):
    """One JSON object per access-log record: the time, then its ``SDSERVE_*`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {"time": round(record.created, 6)}
        for key, value in record.__dict__.items():
            if key.startswith("SDSERVE_") and key != "SDSERVE_PHASE":
                line[key[8:].lower()] = value
        return json.dumps(line, separators=(",", ":"))


def json_to_stdout(logger: logging.Logger = log) -> None:
    """Send ``logger``'s records as JSON lines to stdout (through a queue and a thread of
    their own), instead of sdserve's log target."""
    if any(isinstance(h, LogQueue) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonLines())
    logger.addHandler(LogQueue(handler))
    logger.propagate = False


class AccessLog:
    """The middleware and response hook of one application."""

    def __init__(
        self,
        *,
        enabled: bool,
        sample: float,
        probes: bool,
        exempt: AbstractSet[str],
        logger: logging.Logger = log,
    ) -> None:
        self.enabled = enabled
        self.sample = sample
        self.probes = probes
        #: paths left out of the log (the health probes), read at each request
        self.exempt = exempt
        self.logger = logger

    def install(self, app: web.Application) -> None:
        """Outside every middleware but the proxies' (install those after)."""
        app.middlewares.insert(0, self._middleware)
        app.on_response_prepare.append(self._on_response_prepare)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        began = time.monotonic()
        headers = request.headers
        trace = parse_traceparent(headers.get("traceparent")) or os.urandom(16).hex()
        request[TRACE_KEY] = trace
        given = headers.get("X-Request-Id")
        request[REQUEST_ID_KEY] = given if given and _REQUEST_ID.match(given) else trace
        if not self.enabled:
            return await handler(request)
        status = 500
        response: web.StreamResponse | None = None
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            if (status >= 500 or self.sample >= 1.0 or random.random() < self.sample) and (
                self.probes or request.path not in self.exempt
            ):
                self._emit(request, status, began, response)

    def _emit(
        self,
        request: web.Request,
        status: int,
        began: float,
        response: web.StreamResponse | None,
    ) -> None:
        ms = round((time.monotonic() - began) * 1000, 3)
        out = 0
        if response is not None:
            out = response.content_length or response.body_length or 0
        client = request.remote or "-"
        agent = request.headers.get("User-Agent", "-")
        rid = request[REQUEST_ID_KEY]
        method, path = request.method, request.path_qs
        self.logger.info(
            '%s "%s %s" %d %d %.1fms "%s" %s',
            client,
            method,
            path,
            status,
            out,
            ms,
            agent,
            rid,
            extra={
                "SDSERVE_PHASE": "access",
                "SDSERVE_METHOD": method,
                "SDSERVE_PATH": path,
                "SDSERVE_STATUS": status,
                "SDSERVE_DURATION_MS": ms,
                "SDSERVE_BYTES_IN": request.content_length or 0,
                "SDSERVE_BYTES_OUT": out,
                "SDSERVE_CLIENT": client,
                "SDSERVE_USER_AGENT": agent,
                "SDSERVE_REQUEST_ID": rid,
                "SDSERVE_TRACE_ID": request[TRACE_KEY],
            },
        )

    async def _on_response_prepare(
        self, request: web.BaseRequest, response: web.StreamResponse
    ) -> None:
        trace = request.get(TRACE_KEY)
        if trace is None:
            return  # not through the middleware (an error before it)
        response.headers["traceparent"] = f"00-{trace}-{os.urandom(8).hex()}-01"
        response.headers["X-Request-Id"] = request[REQUEST_ID_KEY]
