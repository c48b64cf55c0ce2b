"""The drill's JSON output, schema version 1 (``"schema": "sdserve.drill/1"``).

The types below are the schema: every object in the file is one of these
TypedDicts, with exactly these keys.  Times are seconds since the drill's start
(``_s``), latencies are milliseconds (``_ms``), both floats.  Compatible additions
keep the version; removing or changing the meaning of a key bumps it.

Top level (:class:`DrillJson`)::

    schema        "sdserve.drill/1"
    started_at    UTC wall-clock start, ISO 8601
    duration_s    how long the load ran
    spec          the load that was asked for (SpecJson)
    passed        failures <= max_failures
    max_failures  the threshold the run was judged against
    phases        "overall", "steady", "during", "after": PhaseJson each
                  (during = the request overlapped an action; after = it started
                  within after_window_s of an action's end; steady = the rest)
    by_action     action name -> PhaseJson of the requests that overlapped one of
                  that action's runs
    not_sent      requests the drill could not send (its in-flight limit): not
                  counted as requests; a drill limit, not a failure of the target
    targets       one TargetJson per URL, the WebSocket URL last
    connections   Counts of requests that opened their connection ("new") and
                  of those sent on a connection that had carried an earlier
                  request or in an open WebSocket session ("reused"); and the
                  keep-alive connections opened ("keepalive_opened": beyond the
                  pool's size, reconnects) and closed by the server
                  ("keepalive_closed_by_server": a Connection: close response, or
                  a close while idle in the pool)
    websocket     WebSocketJson: sessions and how they ended
    actions       one ActionJson per action performed, in order of start
    host          HostJson: CPUs, the 1-minute load average at the start and end,
                  the CPU seconds the load processes used and drill_busy, that
                  over (duration x processes): near 1, the drill itself was the
                  bottleneck
    timeline      one SecondJson per second, by the second a request ended
    resources     ResourceJson samples of the target's process tree
    errors        problems of the drill itself (e.g. a load process died)

A PhaseJson counts requests by class (see :mod:`sdserve.drill.outcome`: success,
refused, reset, eof, timeout, 5xx, other_status, other_error; every class always
present), the 5xx and other statuses by code, and holds latency percentiles
(p50/p90/p99/p99.9/max over the requests that got a response, from a log-linear
histogram; null when there was none).  Latency is measured from the moment a
request was meant to be sent, so an open-loop drill does not hide a stall.
"""

from __future__ import annotations

from typing import Literal, TypedDict

SCHEMA_VERSION = 1
SCHEMA_ID = f"sdserve.drill/{SCHEMA_VERSION}"

Percentiles = TypedDict(
    "Percentiles",
    {
        "count": int,
        "p50": float | None,
        "p90": float | None,
        "p99": float | None,
        "p99.9": float | None,
        "max": float | None,
    },
)


class Counts(TypedDict):
    requests: int
    failures: int
    classes: dict[str, int]
    status_5xx: dict[str, int]
    status_other: dict[str, int]


class PhaseJson(Counts):
    latency_ms: Percentiles


class TargetJson(Counts):
    url: str
    latency_ms: Percentiles


class SpecTargetJson(TypedDict):
    url: str
    weight: float


class SpecJson(TypedDict):
    targets: list[SpecTargetJson]
    mode: Literal["open", "closed"]
    rate: float | None
    concurrency: int
    keepalive: float
    timeout_s: float
    processes: int
    ws_url: str | None
    ws_clients: int
    ws_interval_s: float
    after_window_s: float


class WebSocketJson(TypedDict):
    sessions: int
    clean_closes: int
    abnormal_closes: int


class ActionJson(TypedDict):
    name: str
    number: int
    start_s: float
    end_s: float
    ok: bool
    detail: str


class SecondJson(TypedDict):
    t: int
    requests: int
    classes: dict[str, int]
    latency_ms: Percentiles


class ResourceJson(TypedDict):
    t_s: float
    pid: int | None
    processes: int
    fds: int
    rss_bytes: int


class Phases(TypedDict):
    overall: PhaseJson
    steady: PhaseJson
    during: PhaseJson
    after: PhaseJson


class ConnectionsJson(TypedDict):
    new: Counts
    reused: Counts
    keepalive_opened: int
    keepalive_closed_by_server: int


class HostJson(TypedDict):
    cpus: int
    load_average_start: float
    load_average_end: float
    drill_cpu_s: float
    drill_busy: float


class DrillJson(TypedDict):
    schema: str
    started_at: str
    duration_s: float
    spec: SpecJson
    passed: bool
    max_failures: int
    not_sent: int
    phases: Phases
    by_action: dict[str, PhaseJson]
    targets: list[TargetJson]
    connections: ConnectionsJson
    websocket: WebSocketJson
    actions: list[ActionJson]
    host: HostJson
    timeline: list[SecondJson]
    resources: list[ResourceJson]
    errors: list[str]
