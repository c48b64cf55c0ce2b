"""What load to send: :class:`DrillSpec`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from sdserve.drill.client import parse_target


@dataclass(frozen=True)
class Target:
    """A URL and its share of the requests (weights are relative)."""

    url: str
    weight: float = 1.0


def default_processes() -> int:
    return max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class DrillSpec:
    """The load.  Open loop at ``rate`` requests per second (all processes together)
    when ``rate`` is set, else closed loop with ``concurrency`` clients.

    ``keepalive`` is the fraction of requests (open loop) or clients (closed loop)
    that reuse connections; the others open a new connection per request.
    ``ws_clients`` WebSocket clients stay connected to ``ws_url`` and echo a message
    every ``ws_interval`` seconds.  ``after_window`` is how long after an action its
    "after" phase lasts.  Each process keeps at most ``max_idle`` idle keep-alive
    connections per target, like a client's connection pool; it closes the others.
    """

    targets: tuple[Target, ...]
    duration: float = 10.0
    rate: float | None = None
    concurrency: int = 16
    keepalive: float = 1.0
    timeout: float = 5.0
    processes: int = field(default_factory=default_processes)
    ws_url: str | None = None
    ws_clients: int = 0
    ws_interval: float = 0.5
    after_window: float = 2.0
    max_inflight: int = 20000
    max_idle: int = 32
    sample_interval: float = 0.5

    def validate(self) -> None:
        """Raise ValueError (or TargetError) on anything unusable."""
        if not self.targets and not (self.ws_url and self.ws_clients):
            raise ValueError("nothing to load: give at least one target URL")
        for t in self.targets:
            ep = parse_target(t.url)
            if ep.scheme != "http":
                raise ValueError(f"{t.url}: HTTP targets must be http:// URLs")
            if t.weight <= 0:
                raise ValueError(f"{t.url}: the weight must be positive")
        if self.ws_clients:
            if not self.ws_url or parse_target(self.ws_url).scheme != "ws":
                raise ValueError("WebSocket clients need a ws:// URL")
            if self.ws_interval <= 0:
                raise ValueError("ws_interval must be positive")
        if not 0 < self.duration <= 24 * 3600:
            raise ValueError("duration must be in (0, 86400] seconds")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be positive")
        if self.rate is None and self.targets and self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if not 0.0 <= self.keepalive <= 1.0:
            raise ValueError("keepalive must be a fraction in [0, 1]")
        if self.max_idle < 0 or self.max_inflight < 1:
            raise ValueError("max_idle must be >= 0 and max_inflight >= 1")
        if self.timeout <= 0 or self.processes < 1 or self.after_window < 0:
            raise ValueError("timeout and processes must be positive, after_window >= 0")

    def shares(self) -> list[dict[str, object]]:
        """The part of the load each process runs (what ``loadgen`` reads)."""
        n = self.processes
        out: list[dict[str, object]] = []
        for k in range(n):
            conc = self.concurrency // n + (1 if k < self.concurrency % n else 0)
            ws = self.ws_clients // n + (1 if k < self.ws_clients % n else 0)
            out.append(
                {
                    "targets": [{"url": t.url, "weight": t.weight} for t in self.targets],
                    "mode": "open" if self.rate is not None else "closed",
                    "rate": (self.rate or 0.0) / n,
                    "offset": k / self.rate if self.rate else 0.0,
                    "concurrency": conc,
                    "keepalive": self.keepalive,
                    "timeout": self.timeout,
                    "duration": self.duration,
                    "ws_url": self.ws_url,
                    "ws_clients": ws,
                    "ws_interval": self.ws_interval,
                    "max_inflight": max(1, self.max_inflight // n),
                    "max_idle": self.max_idle,
                    "seed": k,
                }
            )
        return out
