"""The lifecycle state of one worker, read by the health endpoints and the supervisor."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum

from .checks import CheckRegistry, CheckResult


class Phase(StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass
class WorkerState:
    phase: Phase = Phase.STARTING
    started_at: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    registry: CheckRegistry | None = None
    #: latest result of every check
    results: dict[str, CheckResult] = field(default_factory=dict)

    def record(self, results: list[CheckResult]) -> None:
        for result in results:
            self.results[result.name] = result

    @property
    def started(self) -> bool:
        """Start-up finished (checks passed, warm-up done) at some point."""
        return self.ready_at is not None

    @property
    def accepting_traffic(self) -> bool:
        """Ready and not draining: what /readyz reports."""
        return self.phase is Phase.READY
