"""What a drill measured (:class:`DrillResult`) and the numbers derived from it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from sdserve.drill.actions import ActionRecord
from sdserve.drill.histogram import Histogram
from sdserve.drill.outcome import CLASSES, classify, has_response
from sdserve.drill.resources import ResourceSample
from sdserve.drill.schema import (
    SCHEMA_ID,
    ActionJson,
    Counts,
    DrillJson,
    Percentiles,
    PhaseJson,
    Phases,
    ResourceJson,
    SecondJson,
    SpecJson,
    TargetJson,
)
from sdserve.drill.spec import DrillSpec

F64 = npt.NDArray[np.float64]
I16 = npt.NDArray[np.int16]
Mask = npt.NDArray[np.bool_]

PHASES = ("steady", "during", "after")


@dataclass
class DrillResult:
    """Every request (intended start, latency, outcome code, target, connection reuse),
    plus the context."""

    spec: DrillSpec
    started_at: str
    duration: float
    #: ``time.monotonic()`` at the drill's start: request and action times are relative to it.
    t0: float
    start: F64
    latency: F64
    code: I16
    target: I16
    #: whether the request went over a connection that had carried an earlier one
    #: (a keep-alive reuse, or a message in an open WebSocket session)
    reused: Mask
    actions: list[ActionRecord] = field(default_factory=list)
    resources: list[ResourceSample] = field(default_factory=list)
    not_sent: int = 0
    #: keep-alive connections opened, and closed by the server
    ka_opened: int = 0
    ka_server_closed: int = 0
    ws_sessions: int = 0
    ws_clean_closes: int = 0
    ws_abnormal_closes: int = 0
    #: CPU seconds the load processes used (user + system)
    drill_cpu_s: float = 0.0
    #: the 1-minute load average of this machine when the drill started and ended
    load_average: tuple[float, float] = (0.0, 0.0)
    errors: list[str] = field(default_factory=list)

    # counting ------------------------------------------------------------------
    @property
    def requests(self) -> int:
        return int(self.code.size)

    def class_codes(self) -> dict[str, list[int]]:
        """Class -> the distinct codes seen in it."""
        out: dict[str, list[int]] = {c: [] for c in CLASSES}
        for code in np.unique(self.code).tolist():
            out[classify(int(code))].append(int(code))
        return out

    def counts(self, mask: Mask | None = None) -> Counts:
        codes = self.code if mask is None else self.code[mask]
        classes = dict.fromkeys(CLASSES, 0)
        s5: dict[str, int] = {}
        other: dict[str, int] = {}
        values, numbers = np.unique(codes, return_counts=True)
        for code, n in zip(values.tolist(), numbers.tolist(), strict=True):
            cls = classify(int(code))
            classes[cls] += int(n)
            if cls == "5xx":
                s5[str(code)] = int(n)
            elif cls == "other_status":
                other[str(code)] = int(n)
        total = int(codes.size)
        return {
            "requests": total,
            "failures": total - classes["success"],
            "classes": classes,
            "status_5xx": s5,
            "status_other": other,
        }

    @property
    def failures(self) -> int:
        return self.counts()["failures"]

    def responded(self) -> Mask:
        """Requests that got a response (their latency is meaningful)."""
        lookup = {int(c): has_response(int(c)) for c in np.unique(self.code).tolist()}
        out = np.zeros(self.code.size, dtype=bool)
        for c, ok in lookup.items():
            if ok:
                out |= self.code == c
        return out

    def histogram(self, mask: Mask | None = None) -> Histogram:
        sel = self.responded() if mask is None else (mask & self.responded())
        return Histogram.from_seconds(self.latency[sel])

    def percentiles(self, mask: Mask | None = None) -> Percentiles:
        h = self.histogram(mask)
        s = h.summary_ms()
        return {
            "count": h.total,
            "p50": s["p50"],
            "p90": s["p90"],
            "p99": s["p99"],
            "p99.9": s["p99.9"],
            "max": s["max"],
        }

    # phases ------------------------------------------------------------------------
    def phase_masks(self) -> dict[str, Mask]:
        """during: the request overlapped an action; after: it started within
        ``after_window`` of an action's end; steady: everything else."""
        n = self.code.size
        during = np.zeros(n, dtype=bool)
        after = np.zeros(n, dtype=bool)
        end = self.start + self.latency
        for a in self.actions:
            during |= (self.start <= a.end) & (end >= a.start)
            after |= (self.start > a.end) & (self.start <= a.end + self.spec.after_window)
        after &= ~during
        return {"steady": ~(during | after), "during": during, "after": after}

    def by_action(self) -> dict[str, PhaseJson]:
        """For each action name: the requests that overlapped one of its runs."""
        end = self.start + self.latency
        out: dict[str, PhaseJson] = {}
        for name in dict.fromkeys(a.name for a in self.actions):
            mask = np.zeros(self.code.size, dtype=bool)
            for a in self.actions:
                if a.name == name:
                    mask |= (self.start <= a.end) & (end >= a.start)
            out[name] = self.phase(mask)
        return out

    def phase(self, mask: Mask | None) -> PhaseJson:
        c = self.counts(mask)
        return {**c, "latency_ms": self.percentiles(mask)}

    def phases(self) -> Phases:
        m = self.phase_masks()
        return {
            "overall": self.phase(None),
            "steady": self.phase(m["steady"]),
            "during": self.phase(m["during"]),
            "after": self.phase(m["after"]),
        }

    # per target ---------------------------------------------------------------
    def per_target(self) -> list[TargetJson]:
        urls = [t.url for t in self.spec.targets]
        out: list[TargetJson] = []
        indexes = list(range(len(urls)))
        if self.spec.ws_clients and self.spec.ws_url:
            urls.append(self.spec.ws_url)
            indexes.append(-1)
        for url, idx in zip(urls, indexes, strict=True):
            mask = self.target == idx
            out.append({"url": url, **self.counts(mask), "latency_ms": self.percentiles(mask)})
        return out

    # timeline -------------------------------------------------------------------
    def timeline(self) -> list[SecondJson]:
        """One entry per second, by the second each request ended."""
        ended = np.floor(self.start + self.latency).astype(np.int64)
        seconds = int(max(self.duration, float(ended.max()) + 1 if ended.size else 0.0))
        ended = np.clip(ended, 0, max(seconds - 1, 0))
        order = np.argsort(ended, kind="stable")
        bounds = np.searchsorted(ended[order], np.arange(seconds + 1))
        responded = self.responded()
        out: list[SecondJson] = []
        for s in range(seconds):
            idx = order[bounds[s] : bounds[s + 1]]
            mask = np.zeros(self.code.size, dtype=bool)
            mask[idx] = True
            h = Histogram.from_seconds(self.latency[idx[responded[idx]]])
            summ = h.summary_ms()
            out.append(
                {
                    "t": s,
                    "requests": int(idx.size),
                    "classes": self.counts(mask)["classes"],
                    "latency_ms": {
                        "count": h.total,
                        "p50": summ["p50"],
                        "p90": summ["p90"],
                        "p99": summ["p99"],
                        "p99.9": summ["p99.9"],
                        "max": summ["max"],
                    },
                }
            )
        return out

    # JSON -----------------------------------------------------------------------
    def spec_json(self) -> SpecJson:
        s = self.spec
        return {
            "targets": [{"url": t.url, "weight": t.weight} for t in s.targets],
            "mode": "open" if s.rate is not None else "closed",
            "rate": s.rate,
            "concurrency": s.concurrency,
            "keepalive": s.keepalive,
            "timeout_s": s.timeout,
            "processes": s.processes,
            "ws_url": s.ws_url,
            "ws_clients": s.ws_clients,
            "ws_interval_s": s.ws_interval,
            "after_window_s": s.after_window,
        }

    def to_json(self, max_failures: int = 0) -> DrillJson:
        """The whole result in the documented schema (:mod:`sdserve.drill.schema`)."""
        phases = self.phases()
        actions: list[ActionJson] = [
            {
                "name": a.name,
                "number": a.number,
                "start_s": round(a.start, 6),
                "end_s": round(a.end, 6),
                "ok": a.ok,
                "detail": a.detail,
            }
            for a in sorted(self.actions, key=lambda a: a.start)
        ]
        resources: list[ResourceJson] = [
            {
                "t_s": round(r.t, 3),
                "pid": r.pid,
                "processes": r.processes,
                "fds": r.fds,
                "rss_bytes": r.rss_bytes,
            }
            for r in self.resources
        ]
        return {
            "schema": SCHEMA_ID,
            "started_at": self.started_at,
            "duration_s": round(self.duration, 3),
            "spec": self.spec_json(),
            "passed": phases["overall"]["failures"] <= max_failures,
            "max_failures": max_failures,
            "not_sent": self.not_sent,
            "phases": phases,
            "by_action": self.by_action(),
            "targets": self.per_target(),
            "connections": {
                "new": self.counts(~self.reused),
                "reused": self.counts(self.reused),
                "keepalive_opened": self.ka_opened,
                "keepalive_closed_by_server": self.ka_server_closed,
            },
            "websocket": {
                "sessions": self.ws_sessions,
                "clean_closes": self.ws_clean_closes,
                "abnormal_closes": self.ws_abnormal_closes,
            },
            "actions": actions,
            "host": {
                "cpus": os.cpu_count() or 1,
                "load_average_start": round(self.load_average[0], 2),
                "load_average_end": round(self.load_average[1], 2),
                "drill_cpu_s": round(self.drill_cpu_s, 2),
                "drill_busy": round(
                    self.drill_cpu_s / max(self.duration * self.spec.processes, 1e-9), 3
                ),
            },
            "timeline": self.timeline(),
            "resources": resources,
            "errors": list(self.errors),
        }
