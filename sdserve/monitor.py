"""Checks at run time: re-runs continuous checks in the background after READY=1.

Interface used by the worker: ``CheckMonitor(state, registry, health_config,
notifier)``, ``start()`` after READY=1, ``await stop()`` when the drain begins.
"""

from __future__ import annotations

from .checks import CheckRegistry
from .config import HealthConfig
from .notify import Notifier
from .state import WorkerState


class CheckMonitor:
    def __init__(
        self,
        state: WorkerState,
        registry: CheckRegistry,
        config: HealthConfig,
        notifier: Notifier,
    ) -> None:
        self.state = state
        self.registry = registry
        self.config = config
        self.notifier = notifier

    def start(self) -> None:
        """Start the background runs (not written yet: issue 5)."""

    async def stop(self) -> None:
        """Stop the background runs and wait for them to end."""
