"""Configuration: frozen dataclasses, loaded in layers.

The layers, lowest first: the defaults below, a TOML file (``--config``), the
``SDSERVE_*`` environment, and the command-line flags. Every layer is checked
against the dataclasses: an unknown key is an error, and all the problems of all
layers are reported together in one :class:`ConfigError`.

Environment names are ``SDSERVE_`` followed by the key in upper case; a key of a
section is reached with a double underscore (``SDSERVE_HEALTH__READYZ_PATH``).
Lists are comma-separated there. Durations are seconds, or a number with a unit:
``250ms``, ``2s``, ``1.5min``.

Deadlines nest from the outside in: systemd's ``TimeoutStopSec`` must exceed
:attr:`Config.stop_budget`, which bounds everything sdserve does on stop (the
drain delay, the drain itself and the cleanup hooks). Tools that render unit
files take it from there.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import ipaddress
import json
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NewType

from .cpus import available_cpus

ENV_PREFIX = "SDSERVE_"
#: a plain number in the config (a share, a margin, a factor): where ``float`` is a
#: duration (seconds, or ``250ms``, ``2s``...), a Number takes no unit
Number = NewType("Number", float)
#: one worker per CPU this process may use (affinity and cgroup quota count)
DEFAULT_WORKERS = available_cpus()

LogTarget = Literal["auto", "journal", "stderr", "json"]
ReapOrphans = Literal["auto", "yes", "no"]
LogLevel = Literal["debug", "info", "warning", "error"]
AccessLogFormat = Literal["log", "json"]
HealthPlacement = Literal["main", "admin", "both"]
EventLoop = Literal["auto", "uvloop", "asyncio"]


class ConfigError(Exception):
    """One or more configuration problems; ``problems`` lists every one of them."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        if len(self.problems) == 1:  # one line
            super().__init__(f"invalid configuration: {self.problems[0]}")
            return
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration ({len(self.problems)} problem(s)):\n{lines}")


@dataclass(frozen=True)
class HealthConfig:
    """Health endpoints (``/livez``, ``/readyz``, ``/startupz``).

    The meaning of every field is its ``metadata["doc"]``, from which
    :mod:`sdserve.reference` renders the configuration reference.
    """

    enabled: bool = field(
        default=True,
        metadata={"doc": "serve the health endpoints (false: the application serves its own)"},
    )
    livez_path: str = field(default="/livez", metadata={"doc": "path of the liveness endpoint"})
    readyz_path: str = field(default="/readyz", metadata={"doc": "path of the readiness endpoint"})
    startupz_path: str = field(
        default="/startupz", metadata={"doc": "path of the start-up endpoint"}
    )
    placement: HealthPlacement = field(
        default="both",
        metadata={
            "doc": "where the endpoints are served: the main socket(s), the admin socket, or both"
        },
    )
    details_on_main: bool = field(
        default=False,
        metadata={
            "doc": "show each check's details on the main socket too (the admin socket "
            "always shows them)"
        },
    )
    fail_threshold: int = field(
        default=3,
        metadata={
            "doc": "consecutive failures of a continuous critical check before readiness "
            "turns false"
        },
    )
    pass_threshold: int = field(
        default=1,
        metadata={"doc": "consecutive successes before readiness turns true again"},
    )
    interval: float = field(
        default=10.0,
        metadata={
            "doc": "how often continuous checks re-run after start (a check's own `interval` wins)"
        },
    )
    loop_stall: float = field(
        default=10.0,
        metadata={"doc": "liveness fails when the event loop has not turned for this long"},
    )
    stall_hold: float = field(
        default=30.0,
        metadata={
            "doc": "after a stall, liveness keeps failing this long (so that the next probe "
            "sees it)"
        },
    )


@dataclass(frozen=True)
class OverloadConfig:
    """Admission control under overload (:mod:`sdserve.admission`): an adaptive
    concurrency limit per worker, a wait queue with a deadline, priorities, a rate per
    client. ``max_concurrency`` stays a hard cap above all of it."""

    enabled: bool = field(
        default=False,
        metadata={
            "doc": "adaptive admission control (Gradient2 limit, CoDel queue), its "
            "bookkeeping engaged only under pressure; false (the default: under "
            "closed-loop saturation deeper than `queue_target`, it sheds clients a static "
            "cap would serve): only `max_concurrency`, a static cap"
        },
    )
    initial_limit: int = field(
        default=20,
        metadata={"doc": "concurrency limit per worker at start, before latency moves it"},
    )
    min_limit: int = field(
        default=4,
        metadata={"doc": "the adaptive limit never goes below this many requests in flight"},
    )
    max_limit: int = field(
        default=1000,
        metadata={
            "doc": "the adaptive limit never goes above this (nor above `max_concurrency` "
            "when that is set)"
        },
    )
    queue_size: int = field(
        default=128,
        metadata={"doc": "requests that may wait for a slot, per worker; 0: none wait"},
    )
    queue_target: float = field(
        default=0.005,
        metadata={
            "doc": "the longest wait for a slot under sustained overload (CoDel's target); "
            "the queue is then served newest first"
        },
    )
    queue_interval: float = field(
        default=0.1,
        metadata={
            "doc": "the longest wait otherwise; a worker not idle once in this long is "
            "overloaded (CoDel's interval)"
        },
    )
    critical_paths: tuple[str, ...] = field(
        default=(),
        metadata={
            "doc": "path prefixes of critical requests: past the adaptive limit (not the "
            "hard cap), first in the queue"
        },
    )
    sheddable_paths: tuple[str, ...] = field(
        default=(),
        metadata={
            "doc": "path prefixes of sheddable requests: never queued, refused first under overload"
        },
    )
    priority_header: str = field(
        default="",
        metadata={
            "doc": "a request header whose value (critical, normal, sheddable) sets the "
            "priority, over the paths; empty: none (set it only where a proxy you trust "
            "sets it)"
        },
    )
    client_rate: int = field(
        default=0,
        metadata={
            "doc": "requests per second one client address may send to one worker (a "
            "token bucket), 503 past it; 0: no limit"
        },
    )
    client_burst: int = field(
        default=0,
        metadata={"doc": "requests a client may send at once above its rate; 0: `client_rate`"},
    )
    log_interval: float = field(
        default=10.0,
        metadata={"doc": "while shedding, a summary of the refusals at most this often"},
    )


@dataclass(frozen=True)
class Config:
    """The effective configuration of one sdserve process.

    The meaning of every field is its ``metadata["doc"]`` (``metadata["default"]``
    describes a default that depends on the machine), from which
    :mod:`sdserve.reference` renders the configuration reference, ``sdserve config
    --help-keys`` and the help of the flags.
    """

    app: str = field(default="", metadata={"doc": "the application, `MODULE:FACTORY`"})
    bind: tuple[str, ...] = field(
        default=("127.0.0.1:8080",),
        metadata={
            "doc": "addresses to bind when not socket-activated: HOST:PORT (a host name "
            "binds every address it resolves to), [V6]:PORT, PORT (127.0.0.1:PORT), unix:PATH"
        },
    )
    admin_bind: tuple[str, ...] = field(
        default=(),
        metadata={
            "doc": "addresses of the admin socket (health endpoints only) when not socket-activated"
        },
    )
    backlog: int = field(
        default=4096,
        metadata={
            "doc": "listen backlog of the sockets sdserve binds itself (the kernel caps it "
            "at net.core.somaxconn)"
        },
    )
    workers: int = field(
        default=DEFAULT_WORKERS,
        metadata={
            "doc": "worker processes under a supervisor; 0 serves in the main process, "
            "which cannot reload",
            "default": "one per usable CPU",
        },
    )
    start_timeout: float = field(
        default=60.0,
        metadata={
            "doc": "deadline for the start-up hooks, the dependency checks and the warm-up at start"
        },
    )
    retry_initial: float = field(
        default=0.2,
        metadata={
            "doc": "first pause between retries of failing critical checks at start; it "
            "doubles after each retry, up to `retry_max`"
        },
    )
    retry_max: float = field(
        default=5.0,
        metadata={
            "doc": "longest pause between retries of failing checks at start (at least "
            "`retry_initial`)"
        },
    )
    drain_delay: float = field(
        default=0.0,
        metadata={
            "doc": "on a stop, keep serving but report not ready this long before the "
            "drain starts (for load balancers to notice; longer than `lb_check_window`)"
        },
    )
    lb_check_window: float = field(
        default=0.0,
        metadata={
            "doc": "the longest the load balancer in front takes to take this host out of "
            "rotation once /readyz fails (HAProxy: inter + (fall - 1) x fastinter + timeout "
            "check); a shorter `drain_delay` is warned about at start; 0: not known"
        },
    )
    shutdown_timeout: float = field(
        default=25.0,
        metadata={
            "doc": "in-flight requests may run this long once the drain starts; those "
            "still running then are cancelled (exit status 4)"
        },
    )
    idle_grace: float = field(
        default=1.0,
        metadata={
            "doc": "in a drain, an idle keep-alive connection gets this long from its last "
            "request to send one more, and a request still arriving this long to "
            "complete (one handed over does not wait for it)"
        },
    )
    handover: bool = field(
        default=True,
        metadata={
            "doc": "hand idle keep-alive connections over instead of closing them: to the "
            "new workers on a reload, through systemd's fd store on a restart"
        },
    )
    fd_store_max: int = field(
        default=0,
        metadata={
            "doc": "the unit's FileDescriptorStoreMax=, for systemd before 254, which does "
            "not tell the service ($FDSTORE); 0 takes it from $FDSTORE (no store: "
            "restarts drain)"
        },
    )
    cleanup_timeout: float = field(
        default=5.0,
        metadata={
            "doc": "the application's on_cleanup hooks get this long (on_shutdown runs as "
            "the drain begins, within `shutdown_timeout`)"
        },
    )
    keepalive_timeout: float = field(
        default=15.0,
        metadata={
            "doc": "close a keep-alive connection idle this long (below "
            "`shutdown_timeout`, far below nginx's 75 s, not gunicorn's 2 s)"
        },
    )
    header_timeout: float = field(
        default=10.0,
        metadata={
            "doc": "a request's line and headers must arrive within this long of its first "
            "byte, else 408 and the connection closes (slowloris)"
        },
    )
    max_request_line: int = field(
        default=4094,
        metadata={
            "doc": "the longest request line (method, URL, version) in bytes; 414 past it "
            "(gunicorn's limit_request_line)"
        },
    )
    max_header_size: int = field(
        default=8190,
        metadata={
            "doc": "the longest header field (name and value) in bytes; 431 past it "
            "(gunicorn's limit_request_field_size)"
        },
    )
    max_headers: int = field(
        default=100,
        metadata={
            "doc": "the most header fields in a request; 431 past it (gunicorn's "
            "limit_request_fields)"
        },
    )
    max_body_size: int = field(
        default=1_048_576,
        metadata={
            "doc": "the largest request body by its Content-Length, in bytes: 413 before "
            "the handler runs (nginx's client_max_body_size); 0: no limit"
        },
    )
    max_connections: int = field(
        default=512,
        metadata={
            "doc": "connections one process holds at most; past it, it stops accepting and "
            "the kernel's queue holds the rest (the admin socket is not limited), and for "
            "a client waiting there it closes keep-alive connections idle 1 s or more (a "
            "quarter of `keepalive_timeout` if less), the longest idle first"
        },
    )
    request_timeout: float = field(
        default=0.0,
        metadata={
            "doc": "cancel a request running longer: 503 with Retry-After if its response "
            "had not begun; 0: no limit (health probes are never bounded)"
        },
    )
    max_concurrency: int = field(
        default=0,
        metadata={
            "doc": "hard cap: answer 503 with Retry-After past this many requests in flight "
            "per process, whatever the adaptive limit (`[overload]`) says; 0: no cap "
            "(health probes are never shed; WebSockets and server-sent events are not held "
            "or counted once under way)"
        },
    )
    reload_timeout: float = field(
        default=60.0,
        metadata={
            "doc": "on a reload, each new worker must be ready within this long of its "
            "start, else the reload fails"
        },
    )
    max_requests: int = field(
        default=0,
        metadata={
            "doc": "recycle a worker (zero-gap, as a reload) after this many requests; 0: never"
        },
    )
    max_requests_jitter: int = field(
        default=0,
        metadata={
            "doc": "up to this many more requests, chosen at random per worker, so that "
            "workers do not recycle together"
        },
    )
    warmup_nice: int = field(
        default=10,
        metadata={
            "doc": "new workers import and warm up this much nicer (0 to 19), so that a "
            "reload takes no CPU from the workers serving; 0 disables it"
        },
    )
    warmup_parallel: int = field(
        default=1,
        metadata={
            "doc": "during a reload, new workers warm up this many at a time; 0: all at once"
        },
    )
    crash_limit: int = field(
        default=5,
        metadata={
            "doc": "failed starts in a row (a worker that exits before it is ready, or dies "
            "within `crash_window` of it) that fail a start or a reload, or, with no "
            "worker left serving, stop the service (exit status 6)"
        },
    )
    crash_window: float = field(
        default=10.0,
        metadata={
            "doc": "a worker that has served this long started well: its death is replaced "
            "without counting towards `crash_limit`"
        },
    )
    canary_workers: int = field(
        default=0,
        metadata={
            "doc": "a reload first starts this many new workers beside the serving ones and "
            "judges them over `canary_watch` before it goes on (0: no canary; `sdserve "
            "reload --canary N` asks for one reload)"
        },
    )
    canary_watch: float = field(
        default=30.0,
        metadata={"doc": "how long a canary serves beside the old generation before it passes"},
    )
    canary_min_requests: int = field(
        default=50,
        metadata={
            "doc": "requests the canary must serve to be judged (a failure is decided as "
            "soon as it has them; with fewer at the end, the reload completes)"
        },
    )
    canary_error_margin: Number = field(
        default=Number(0.02),
        metadata={
            "doc": "the canary's 5xx ratio may exceed the old generation's by at most this "
            "(0.02: two points), else the reload is rolled back"
        },
    )
    canary_latency_factor: Number = field(
        default=Number(3.0),
        metadata={
            "doc": "the canary's p99 may be at most this many times the old generation's "
            "(plus 20 ms), else the reload is rolled back"
        },
    )
    loop: EventLoop = field(
        default="auto",
        metadata={
            "doc": "the event loop of the processes that serve: uvloop (faster), asyncio, "
            "or auto (uvloop when it is installed, as the packages install it; asyncio "
            "for a single process that reaps orphans, since uvloop keeps SIGCHLD)"
        },
    )
    log: LogTarget = field(
        default="auto",
        metadata={
            "doc": "where logs go: journal (structured fields), stderr, json (one JSON "
            "object per line on stdout, for containers), or auto (the journal when stderr "
            "is connected to it, else stderr)"
        },
    )
    log_level: LogLevel = field(default="info", metadata={"doc": "the lowest level logged"})
    reap_orphans: ReapOrphans = field(
        default="auto",
        metadata={
            "doc": "reap orphaned processes that end up as sdserve's children (their zombies "
            "would pile up otherwise): auto does it when sdserve is PID 1 (in a container), "
            "yes also elsewhere (sdserve becomes a child subreaper), no never"
        },
    )
    warm_template: bool = field(
        default=True,
        metadata={
            "doc": "fork new workers from a process that has imported the libraries (not "
            "the application), instead of starting each by fork and exec: a reload costs "
            "the workers serving less; rebuilt when a library changes on disk; off with "
            "reap_orphans = no (the supervisor adopts its workers and reaps other orphans)"
        },
    )
    access_log: bool = field(
        default=False,
        metadata={
            "doc": "log one line per request of the main socket (logger sdserve.access, "
            "sdserve.accesslog), with its trace id"
        },
    )
    overload: OverloadConfig = field(
        default_factory=OverloadConfig,
        metadata={
            "doc": "admission control under overload: the adaptive concurrency limit, the "
            "wait queue and its deadline, priorities, a rate per client"
        },
    )
    access_log_format: AccessLogFormat = field(
        default="log",
        metadata={
            "doc": "log: through `log` (journal fields, stderr, or JSON lines with "
            "log = json); json: JSON lines on stdout (containers)"
        },
    )
    access_log_sample: Number = field(
        default=Number(1.0),
        metadata={"doc": "the share of requests logged, 0 to 1 (a 5xx is always logged)"},
    )
    access_log_probes: bool = field(
        default=False, metadata={"doc": "log the health probes and /metrics too"}
    )
    trace_ids: bool = field(
        default=False,
        metadata={
            "doc": "W3C trace ids (`traceparent`, `X-Request-Id`, `request['trace_id']`) "
            "without the access log (with it they are always on)"
        },
    )
    trusted_proxies: tuple[str, ...] = field(
        default=(),
        metadata={
            "doc": "peers whose Forwarded / X-Forwarded-For / X-Forwarded-Proto are "
            "believed: CIDRs or addresses, and `unix` for a peer on a unix socket"
        },
    )
    metrics: bool = field(
        default=True,
        metadata={
            "doc": "Prometheus metrics of the whole service at `metrics_path` on the admin "
            "socket (sdserve.metrics)"
        },
    )
    metrics_on_main: bool = field(
        default=False,
        metadata={"doc": "serve the metrics on the main socket too (the admin socket is better)"},
    )
    metrics_path: str = field(default="/metrics", metadata={"doc": "the metrics endpoint's path"})
    health: HealthConfig = field(
        default_factory=HealthConfig,
        metadata={
            "doc": "the health endpoints (/livez, /readyz, /startupz): where they are served, "
            "and how checks and the event loop turn them"
        },
    )
    checks: Mapping[str, Mapping[str, Any]] = field(
        default_factory=dict,
        metadata={
            "doc": "dependency checks, one `[checks.NAME]` table each, validated at start "
            "with the rest of the configuration"
        },
    )

    @property
    def stop_budget(self) -> float:
        """Upper bound of a graceful stop: systemd's TimeoutStopSec must exceed it."""
        return self.drain_delay + self.shutdown_timeout + self.cleanup_timeout

    def with_overrides(self, **changes: Any) -> Config:
        """A copy with some top-level values replaced (for tests and the supervisor)."""
        return dataclasses.replace(self, **changes)


# -- loading ---------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|sec|min|m|h)?\s*$")
_NUMBER = re.compile(r"^\s*-?[0-9]*\.?[0-9]+\s*$")
_UNITS = {None: 1.0, "s": 1.0, "sec": 1.0, "ms": 0.001, "min": 60.0, "m": 60.0, "h": 3600.0}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type) -> dict[str, Any]:
    hints = _hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


#: whole numbers in the config are 64-bit, as TOML's are
_INT64 = 1 << 63
_C_INT_MAX = (1 << 31) - 1
#: more workers than this is a typo (each is a process of its own, tens of MB at least)
MAX_WORKERS = 1024

#: validates the ``[checks.NAME]`` tables of a config file (given the environment, for
#: the secrets); returns every problem, each naming ``checks.NAME.key``
CheckTablesValidator = Callable[[Mapping[str, Mapping[str, Any]], Mapping[str, str]], Sequence[str]]


def _convert(value: Any, tp: Any, where: str, problems: _Problems, from_text: bool) -> Any:
    """Convert one raw value to ``tp``; on failure record a problem and return a sentinel."""
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        problems.add(where, f"expected true or false, got {value!r}")
    elif tp is int:
        number: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str) and re.fullmatch(r"\s*-?[0-9]+\s*", value):
            number = int(value)
        if number is not None and -_INT64 <= number < _INT64:
            return number
        if number is not None:
            problems.add(where, f"expected a whole number of 64 bits at most, got {value!r}")
        else:
            problems.add(where, f"expected a whole number, got {value!r}")
    elif tp is Number:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if math.isfinite(value):
                return float(value)
        elif isinstance(value, str) and _NUMBER.match(value):
            return float(value)
        problems.add(where, f"expected a number (such as 0.5 or 3), got {value!r}")
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if math.isfinite(value):
                return float(value)
        elif isinstance(value, str) and (m := _DURATION.match(value)):
            return float(m.group(1)) * _UNITS[m.group(2)]
        problems.add(
            where, f"expected a duration (seconds, or e.g. 250ms, 2s, 1min), got {value!r}"
        )
    elif tp is str:
        if isinstance(value, str):
            return value
        problems.add(where, f"expected a string, got {value!r}")
    elif origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        problems.add(where, f"expected one of {', '.join(map(str, allowed))}, got {value!r}")
    elif origin is tuple:
        if from_text and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
        problems.add(where, f"expected a list of strings, got {value!r}")
    elif origin in (Mapping, dict) or tp is Mapping:
        if isinstance(value, Mapping) and all(isinstance(v, Mapping) for v in value.values()):
            return types.MappingProxyType(
                {k: types.MappingProxyType(dict(v)) for k, v in value.items()}
            )
        problems.add(where, "expected a table of tables")
    else:  # pragma: no cover - a field of a type this loader does not know is a programming error
        raise TypeError(f"unsupported config type {tp!r} at {where}")
    return _INVALID


_INVALID = object()


def _apply(
    target: dict[str, Any],
    cls: type,
    raw: Mapping[str, Any],
    source: str,
    problems: _Problems,
    *,
    prefix: str = "",
    from_text: bool = False,
    label: Callable[[str], str] = str,
) -> None:
    """Check ``raw`` against ``cls`` and merge the converted values into ``target``.

    ``label`` turns a key's dotted name into the name the user wrote (the variable of
    the environment, the flag of the command line), for the problems."""
    fields = _fields(cls)
    for key, value in raw.items():
        name = f"{prefix}{key}"
        where = f"{source}: {label(name)}"
        if key not in fields:
            problems.add(where, _unknown(key, fields))
            continue
        tp = fields[key]
        if _is_dataclass_type(tp):
            if not isinstance(value, Mapping):
                problems.add(where, "expected a table")
                continue
            sub = target.setdefault(key, {})
            _apply(
                sub,
                tp,
                value,
                source,
                problems,
                prefix=f"{name}.",
                from_text=from_text,
                label=label,
            )
            continue
        converted = _convert(value, tp, where, problems, from_text)
        if converted is not _INVALID:
            target[key] = converted


def _unknown(key: str, fields: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(key.replace("-", "_"), list(fields), n=1, cutoff=0.75)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key{hint}"


def _env_name(name: str) -> str:
    """``health.readyz_path`` -> ``SDSERVE_HEALTH__READYZ_PATH``."""
    return ENV_PREFIX + name.upper().replace(".", "__")


def _flag_name(name: str) -> str:
    """``shutdown_timeout`` -> ``--shutdown-timeout``."""
    return "--" + name.replace("_", "-")


def _env_layer(environ: Mapping[str, str], problems: _Problems) -> dict[str, Any]:
    """``SDSERVE_*`` variables as a nested raw mapping; unknown names are problems."""
    raw: dict[str, Any] = {}
    top = _fields(Config)
    for var, text in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX):
            continue
        path = var[len(ENV_PREFIX) :].lower().split("__")
        if path[0] == "checks" or path[0] not in top:
            problems.add(f"environment: {var}", "unknown setting")
            continue
        if len(path) == 1:
            raw[path[0]] = text
        elif len(path) == 2 and _is_dataclass_type(top[path[0]]):
            raw.setdefault(path[0], {})[path[1]] = text
        else:
            problems.add(f"environment: {var}", "unknown setting")
    return raw


def _build(cls: type, values: Mapping[str, Any]) -> Any:
    kwargs = {}
    for name, tp in _fields(cls).items():
        if name in values:
            kwargs[name] = _build(tp, values[name]) if _is_dataclass_type(tp) else values[name]
    return cls(**kwargs)


def _validate(cfg: Config, problems: _Problems) -> None:
    def positive(name: str, value: float) -> None:
        if value <= 0:
            problems.add(name, f"must be greater than 0, got {value}")

    def non_negative(name: str, value: float) -> None:
        if value < 0:
            problems.add(name, f"must not be negative, got {value}")

    positive("start_timeout", cfg.start_timeout)
    positive("shutdown_timeout", cfg.shutdown_timeout)
    positive("cleanup_timeout", cfg.cleanup_timeout)
    positive("keepalive_timeout", cfg.keepalive_timeout)
    positive("header_timeout", cfg.header_timeout)
    non_negative("request_timeout", cfg.request_timeout)
    non_negative("max_body_size", cfg.max_body_size)
    for key in ("max_request_line", "max_header_size", "max_headers", "max_connections"):
        if getattr(cfg, key) < 1:
            problems.add(key, f"must be at least 1, got {getattr(cfg, key)}")
    positive("reload_timeout", cfg.reload_timeout)
    positive("retry_initial", cfg.retry_initial)
    positive("crash_window", cfg.crash_window)
    positive("health.interval", cfg.health.interval)
    positive("health.loop_stall", cfg.health.loop_stall)
    non_negative("drain_delay", cfg.drain_delay)
    non_negative("lb_check_window", cfg.lb_check_window)
    non_negative("idle_grace", cfg.idle_grace)
    non_negative("max_requests", cfg.max_requests)
    non_negative("max_requests_jitter", cfg.max_requests_jitter)
    non_negative("max_concurrency", cfg.max_concurrency)
    if not 0.0 <= cfg.access_log_sample <= 1.0:
        problems.add("access_log_sample", f"must be from 0 to 1, got {cfg.access_log_sample}")
    for proxy in cfg.trusted_proxies:
        if proxy != "unix":
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                problems.add(
                    "trusted_proxies",
                    f"{proxy!r} is neither an address, a CIDR nor 'unix'",
                )
    non_negative("fd_store_max", cfg.fd_store_max)
    non_negative("warmup_parallel", cfg.warmup_parallel)
    non_negative("health.stall_hold", cfg.health.stall_hold)
    ov = cfg.overload
    for key in ("initial_limit", "min_limit", "max_limit"):
        if getattr(ov, key) < 1:
            problems.add(f"overload.{key}", f"must be at least 1, got {getattr(ov, key)}")
    if ov.max_limit < ov.min_limit:
        problems.add("overload.max_limit", f"must be at least overload.min_limit ({ov.min_limit})")
    for key in ("queue_size", "client_rate", "client_burst"):
        non_negative(f"overload.{key}", getattr(ov, key))
    positive("overload.queue_target", ov.queue_target)
    positive("overload.log_interval", ov.log_interval)
    if ov.queue_interval < ov.queue_target:
        problems.add(
            "overload.queue_interval",
            f"must be at least overload.queue_target ({ov.queue_target}s)",
        )
    for key in ("critical_paths", "sheddable_paths"):
        for prefix in getattr(ov, key):
            if not prefix.startswith("/"):
                problems.add(
                    f"overload.{key}", f"a path prefix must start with '/', got {prefix!r}"
                )
    if ov.priority_header and not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", ov.priority_header):
        problems.add(
            "overload.priority_header", f"must be a header name, got {ov.priority_header!r}"
        )
    if not 0 <= cfg.warmup_nice <= 19:
        problems.add("warmup_nice", f"must be between 0 and 19, got {cfg.warmup_nice}")
    if cfg.retry_max < cfg.retry_initial:
        problems.add("retry_max", f"must be at least retry_initial ({cfg.retry_initial})")
    if cfg.loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        problems.add(
            "loop", 'uvloop is not installed (pip install uvloop, or loop = "asyncio" or "auto")'
        )
    if cfg.workers < 0:
        problems.add("workers", f"must not be negative, got {cfg.workers}")
    elif cfg.workers > MAX_WORKERS:
        problems.add("workers", f"must be at most {MAX_WORKERS}, got {cfg.workers}")
    non_negative("canary_workers", cfg.canary_workers)
    positive("canary_watch", cfg.canary_watch)
    if cfg.canary_min_requests < 1:
        problems.add("canary_min_requests", f"must be at least 1, got {cfg.canary_min_requests}")
    if not 0 <= cfg.canary_error_margin <= 1:
        problems.add(
            "canary_error_margin", f"must be between 0 and 1, got {cfg.canary_error_margin}"
        )
    if cfg.canary_latency_factor < 1:
        problems.add(
            "canary_latency_factor", f"must be at least 1, got {cfg.canary_latency_factor}"
        )
    if cfg.crash_limit < 1:
        problems.add("crash_limit", f"must be at least 1, got {cfg.crash_limit}")
    if cfg.backlog < 1:
        problems.add("backlog", f"must be at least 1, got {cfg.backlog}")
    elif cfg.backlog > _C_INT_MAX:  # listen(2) takes a C int (the kernel caps it at somaxconn)
        problems.add("backlog", f"must be at most {_C_INT_MAX}, got {cfg.backlog}")
    # The idle grace is part of the drain, so it must fit inside the drain's deadline.
    if cfg.idle_grace >= cfg.shutdown_timeout > 0:
        problems.add(
            "idle_grace",
            f"must be shorter than shutdown_timeout ({cfg.shutdown_timeout}s), "
            f"got {cfg.idle_grace}s",
        )
    for t in ("fail_threshold", "pass_threshold"):
        if getattr(cfg.health, t) < 1:
            problems.add(f"health.{t}", "must be at least 1")
    seen: dict[str, str] = {}
    for p in ("livez_path", "readyz_path", "startupz_path"):
        path = getattr(cfg.health, p)
        if not path.startswith("/"):
            problems.add(f"health.{p}", f"must start with '/', got {path!r}")
        elif _NOT_PLAIN.search(path):
            problems.add(
                f"health.{p}", f"must be a plain path (no {{}}, ?, # or spaces), got {path!r}"
            )
        elif path in seen:
            problems.add(
                f"health.{p}", f"is {path!r}, as health.{seen[path]} is: give each its own"
            )
        seen.setdefault(path, p)
    if not cfg.metrics_path.startswith("/") or _NOT_PLAIN.search(cfg.metrics_path):
        problems.add(
            "metrics_path", f"must be a plain path starting with '/', got {cfg.metrics_path!r}"
        )
    elif cfg.metrics_path in seen:
        problems.add(
            "metrics_path", f"is {cfg.metrics_path!r}, as health.{seen[cfg.metrics_path]} is"
        )
    _validate_addresses(cfg, problems)
    if cfg.app and ":" not in cfg.app:
        problems.add("app", f"expected MODULE:FACTORY, got {cfg.app!r}")


#: what makes a path more than a plain path for aiohttp's router (or for a URL)
_NOT_PLAIN = re.compile(r"[{}?#\s]")


def _validate_addresses(cfg: Config, problems: _Problems) -> None:
    """The addresses must parse (host names are resolved when they are bound)."""
    from .binding import BindError, parse_address

    for key in ("bind", "admin_bind"):
        for text in getattr(cfg, key):
            try:
                parse_address(text)
            except BindError as exc:
                problems.add(key, str(exc))


def load_config(
    *,
    toml_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    check_tables: CheckTablesValidator | None = None,
) -> Config:
    """Load the effective configuration from every layer; raise ConfigError listing all problems.

    ``environ`` defaults to ``os.environ``; ``overrides`` are the command-line values
    (only those the user gave), already typed or as text. ``check_tables`` validates the
    file's ``[checks.NAME]`` tables (:func:`sdserve.checks.table_problems`), so that
    their problems come in the same error as the rest, each naming the file.
    """
    environ = os.environ if environ is None else environ
    problems = _Problems()
    values: dict[str, Any] = {}
    if toml_path is not None:
        try:
            with open(toml_path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            problems.add(f"config file {toml_path}", exc.strerror or str(exc))
        except tomllib.TOMLDecodeError as exc:
            problems.add(f"config file {toml_path}", f"not valid TOML: {exc}")
        else:
            _apply(values, Config, data, f"{toml_path}", problems)
            tables = data.get("checks")
            if check_tables is not None and isinstance(tables, Mapping):
                tables = {k: v for k, v in tables.items() if isinstance(v, Mapping)}
                for problem in check_tables(tables, environ) if tables else ():
                    problems.items.append(f"{toml_path}: {problem}")
    env = _env_layer(environ, problems)
    _apply(values, Config, env, "environment", problems, from_text=True, label=_env_name)
    if overrides:
        _apply(
            values, Config, overrides, "command line", problems, from_text=True, label=_flag_name
        )
    # The values that did convert are checked too, so that one run lists every problem.
    cfg: Config = _build(Config, values)
    rules = _Problems()
    _validate(cfg, rules)
    problems.items.extend(rules.items)
    if problems.items:
        raise ConfigError(problems.items)
    return cfg


# -- printing --------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot print {value!r} as TOML")


def _toml_lines(obj: Any, section: str) -> Iterator[str]:
    tables: list[tuple[str, Any]] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) or isinstance(value, Mapping):
            tables.append((f.name, value))
        else:
            yield f"{f.name} = {_toml_value(value)}"
    for name, value in tables:
        full = f"{section}.{name}" if section else name
        if isinstance(value, Mapping):
            for sub, table in value.items():
                yield ""
                yield f"[{full}.{sub}]"
                yield from (f"{k} = {_toml_value(v)}" for k, v in table.items())
        else:
            yield ""
            yield f"[{full}]"
            yield from _toml_lines(value, full)


def dump_toml(cfg: Config) -> str:
    """The configuration as TOML that :func:`load_config` reads back to the same value."""
    return "\n".join(_toml_lines(cfg, "")) + "\n"


# -- handing a validated configuration to another process ------------------------------


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def config_to_json(cfg: Config) -> str:
    """The configuration as JSON, for :func:`config_from_json` in another process.

    The supervisor hands its validated configuration to every worker this way, so
    that a replacement worker never reads a config file that changed on disk.
    """
    return json.dumps(_plain(cfg), separators=(",", ":"))


def config_from_json(text: str) -> Config:
    """The configuration that :func:`config_to_json` wrote, checked again like any layer."""
    problems = _Problems()
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError([f"configuration handed over by the supervisor: {exc}"]) from exc
    if not isinstance(data, dict):
        raise ConfigError(["configuration handed over by the supervisor: not an object"])
    values: dict[str, Any] = {}
    _apply(values, Config, data, "supervisor", problems)
    cfg: Config = _build(Config, values)
    _validate(cfg, problems)
    if problems.items:
        raise ConfigError(problems.items)
    return cfg
