"""Health reports without aiohttp: the entries, their rendering, and the probe query.

Used by :mod:`sdserve.health` (the endpoints served by aiohttp) and by
:mod:`sdserve.probes` (the answers during start-up, before aiohttp is even imported).
See :mod:`sdserve.health` for the formats.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

Status = Literal["pass", "warn", "fail"]

HEALTH_JSON = "application/health+json"
#: checks of /readyz that ``?exclude=`` cannot remove
NOT_EXCLUDABLE = frozenset({"phase"})
_RANK: dict[Status, int] = {"pass": 0, "warn": 1, "fail": 2}


@dataclass(frozen=True)
class Entry:
    """One line of a health report."""

    name: str
    status: Status
    output: str = ""
    component_type: str = "component"
    #: milliseconds (latency, or loop lag), None when there is nothing measured
    observed: float | None = None
    measurement: str = "responseTime"
    #: wall-clock time of the observation
    time: float | None = None


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- rendering -------------------------------------------------------------------------------


def overall(entries: Iterable[Entry]) -> Status:
    worst: Status = "pass"
    for e in entries:
        if _RANK[e.status] > _RANK[worst]:
            worst = e.status
    return worst


def render_text(
    endpoint: str,
    entries: list[Entry],
    excluded: set[str],
    unknown: set[str],
    *,
    verbose: bool,
    details: bool,
) -> str:
    status = overall(entries)
    if status != "fail" and not verbose:
        return "ok\n"
    lines = []
    for e in entries:
        if e.status == "pass":
            line = f"[+]{e.name} ok"
            if details and e.observed is not None and e.measurement == "responseTime":
                line += f" ({e.observed:.1f}ms)"
        elif not details:
            line = f"[-]{e.name} failed: reason withheld"
            if e.status == "warn":
                line = f"[!]{e.name} warn: reason withheld"
        else:
            mark, word = ("[-]", "failed") if e.status == "fail" else ("[!]", "warn")
            line = f"{mark}{e.name} {word}: {e.output or 'no output'}"
        lines.append(line)
    lines.extend(f"[+]{name} excluded: ok" for name in sorted(excluded))
    if unknown:
        lines.append(
            "warn: some health checks cannot be excluded: no matches for "
            + ", ".join(f'"{n}"' for n in sorted(unknown))
        )
    lines.append(f"{endpoint} check {'failed' if status == 'fail' else 'passed'}")
    return "\n".join(lines) + "\n"


def render_json(endpoint: str, entries: list[Entry], *, details: bool) -> str:
    status = overall(entries)
    body: dict[str, Any] = {"status": status, "description": f"sdserve {endpoint}"}
    checks: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        item: dict[str, Any] = {
            "componentId": e.name,
            "componentType": e.component_type,
            "status": e.status,
        }
        if details:
            if e.observed is not None:
                item["observedValue"] = round(e.observed, 3)
                item["observedUnit"] = "ms"
            if e.time is not None:
                item["time"] = _iso(e.time)
            if e.output:
                item["output"] = e.output
        checks[f"{e.name}:{e.measurement}"] = [item]
    body["checks"] = checks
    if status == "fail":
        failing = [e.name for e in entries if e.status == "fail"]
        body["output"] = "failing: " + ", ".join(failing)
    return json.dumps(body, separators=(",", ":")) + "\n"


@dataclass(frozen=True)
class ProbeQuery:
    """What a probe asked for: ``?verbose``, ``?exclude=NAME`` (repeatable or
    comma-separated), ``?format=json|text`` or ``Accept: application/health+json``."""

    verbose: bool = False
    exclude: frozenset[str] = frozenset()
    json: bool = False

    @classmethod
    def parse(cls, getall: Callable[[str], Sequence[str]], accept: str) -> ProbeQuery:
        """From a query's values by name (``getall``) and the Accept header."""

        def flag(name: str) -> bool:
            values = getall(name)
            return bool(values) and values[-1].lower() not in ("0", "false", "no")

        names: set[str] = set()
        for value in getall("exclude"):
            names.update(n.strip() for n in value.split(",") if n.strip())
        fmt = getall("format")
        wants_json = fmt[-1].lower() == "json" if fmt else HEALTH_JSON in accept
        return cls(flag("verbose"), frozenset(names), wants_json)

    @classmethod
    def from_mapping(cls, query: Mapping[str, Sequence[str]], accept: str = "") -> ProbeQuery:
        return cls.parse(lambda name: query.get(name, ()), accept)


def respond(
    endpoint: str, entries: list[Entry], query: ProbeQuery, *, details: bool
) -> tuple[int, str, str]:
    """(status code, body, content type) of a probe's answer."""
    known = {e.name for e in entries}
    excluded = (set(query.exclude) & known) - NOT_EXCLUDABLE
    unknown = set(query.exclude) - excluded
    kept = [e for e in entries if e.name not in excluded]
    code = 503 if overall(kept) == "fail" else 200
    if query.json:
        return code, render_json(endpoint, kept, details=details), HEALTH_JSON
    text = render_text(endpoint, kept, excluded, unknown, verbose=query.verbose, details=details)
    return code, text, "text/plain"
