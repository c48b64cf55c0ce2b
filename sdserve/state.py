"""The lifecycle state of one worker, read by the health endpoints and the supervisor.

Everything a probe reports is read from here: probes never run a check. The
start-up gate records the first results, :class:`sdserve.monitor.CheckMonitor`
keeps them current and keeps the readiness verdict (with hysteresis) and the
event-loop heartbeat that liveness is based on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum

from .checks import CheckRegistry, CheckResult


class Phase(StrEnum):
    STARTING = "starting"
    READY = "ready"
    #: draining because a reload or a recycle replaced this worker: the service is still
    #: ready, so /readyz passes (with Connection: close) and load balancers do not flap
    RETIRING = "retiring"
    #: draining because the service stops: /readyz fails
    DRAINING = "draining"
    STOPPED = "stopped"

    @property
    def takes_traffic(self) -> bool:
        return self in (Phase.READY, Phase.RETIRING)


@dataclass
class LoopHealth:
    """The event-loop heartbeat, kept by the monitor (a timer callback, no thread)."""

    #: ``time.monotonic()`` of the latest heartbeat tick; None before the first one
    last_tick: float | None = None
    #: how late the latest tick ran, seconds
    lag: float = 0.0
    #: the longest lag seen since start, seconds
    max_lag: float = 0.0
    #: the latest stall longer than ``health.loop_stall``: (monotonic end, duration)
    stall: tuple[float, float] | None = None
    #: wall-clock time that stall ended
    stall_wall: float | None = None


@dataclass
class WorkerState:
    phase: Phase = Phase.STARTING
    started_at: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    registry: CheckRegistry | None = None
    #: latest result of every check
    results: dict[str, CheckResult] = field(default_factory=dict)
    #: consecutive outcome of every check: +N successes or -N failures in a row
    streaks: dict[str, int] = field(default_factory=dict)
    #: critical checks that crossed ``health.fail_threshold`` and have not recovered
    unready: set[str] = field(default_factory=set)
    #: completed runs of every check (start-up gate and monitor)
    runs: dict[str, int] = field(default_factory=dict)
    loop: LoopHealth = field(default_factory=LoopHealth)
    #: set when the monitor itself broke (sdserve is broken: liveness fails)
    monitor_error: str | None = None

    def record(self, results: list[CheckResult]) -> None:
        for result in results:
            self.results[result.name] = result
            self.runs[result.name] = self.runs.get(result.name, 0) + 1
            streak = self.streaks.get(result.name, 0)
            if result.ok:
                self.streaks[result.name] = streak + 1 if streak > 0 else 1
            else:
                self.streaks[result.name] = streak - 1 if streak < 0 else -1

    @property
    def started(self) -> bool:
        """Start-up finished (checks passed, warm-up done) at some point."""
        return self.ready_at is not None

    @property
    def dependencies_ready(self) -> bool:
        """No critical check is past its failure threshold."""
        return not self.unready

    @property
    def accepting_traffic(self) -> bool:
        """Ready, not draining, and no critical dependency down: what /readyz reports."""
        return self.phase.takes_traffic and not self.unready
