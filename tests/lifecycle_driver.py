"""A driver for :class:`sdserve.lifecycle.Lifecycle` without processes: a fake clock, fake
PIDs, and a record of what the core asked for (spawns, signals, notify messages, timers)."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Any

from sdserve import lifecycle as lc
from sdserve.config import Config, load_config


def config(**overrides: Any) -> Config:
    return load_config(environ={}, overrides={"app": "m:f", "workers": 2, **overrides})


@dataclass
class Driver:
    cfg: Config
    watchdog: float | None = None
    now: float = 1000.0
    core: lc.Lifecycle = field(init=False)
    actions: list[lc.Action] = field(default_factory=list)
    timers: dict[lc.TimerKey, float] = field(default_factory=dict)
    signals: list[tuple[int, int]] = field(default_factory=list)
    notes: list[lc.Notify] = field(default_factory=list)
    replies: list[lc.Reply] = field(default_factory=list)
    exit_code: int | None = None
    reload_config: Config | str | None = None

    def __post_init__(self) -> None:
        self.core = lc.Lifecycle(
            self.cfg, clock=lambda: self.now, wall=lambda: "12:00:00", watchdog=self.watchdog
        )

    # -- feeding -----------------------------------------------------------------------

    def feed(self, event: lc.Event) -> list[lc.Action]:
        """Handle ``event`` and, like the shell, what the actions feed back at once."""
        pending: list[lc.Event] = [event]
        out: list[lc.Action] = []
        while pending:
            actions = self.core.handle(pending.pop(0))
            out += actions
            for action in actions:
                pending += self._carry_out(action)
        self.actions += out
        return out

    def _carry_out(self, action: lc.Action) -> list[lc.Event]:
        if isinstance(action, lc.Spawn):
            return [lc.Spawned(action.worker, 10_000 + action.worker)]
        if isinstance(action, lc.Kill):
            self.signals.append((action.worker, action.signal))
        elif isinstance(action, lc.SetTimer):
            self.timers[action.key] = self.now + action.delay
        elif isinstance(action, lc.CancelTimer):
            self.timers.pop(action.key, None)
        elif isinstance(action, lc.Notify):
            self.notes.append(action)
        elif isinstance(action, lc.Reply):
            self.replies.append(action)
        elif isinstance(action, lc.Exit):
            self.exit_code = action.code
        elif isinstance(action, lc.LoadConfig):
            loaded = self.reload_config if self.reload_config is not None else self.cfg
            if isinstance(loaded, str):
                return [lc.ConfigRejected(loaded)]
            return [lc.ConfigLoaded(loaded)]
        return []

    def advance(self, seconds: float) -> None:
        """Move the clock, firing the timers that come due, in order."""
        target = self.now + seconds
        while True:
            due = sorted((t, k) for k, t in self.timers.items() if t <= target)
            if not due:
                break
            when, key = due[0]
            self.now = max(self.now, when)
            del self.timers[key]
            self.feed(lc.TimerFired(key))
        self.now = target

    # -- views -------------------------------------------------------------------------

    def phase(self) -> lc.Phase:
        return self.core.phase

    def workers(self, state: lc.WState | None = None, generation: int | None = None) -> list[int]:
        return sorted(
            w.id
            for w in self.core.workers.values()
            if (state is None or w.state is state)
            and (generation is None or w.generation == generation)
        )

    def ready_all(self, generation: int | None = None) -> None:
        """Every starting worker (of ``generation``) ready, and those started meanwhile."""
        for _ in range(100):
            starting = self.workers(lc.WState.STARTING, generation)
            if not starting:
                return
            for wid in starting:
                self.feed(lc.Ready(wid))

    def signalled(self, worker: int) -> list[int]:
        return [sig for w, sig in self.signals if w == worker]

    def kinds(self) -> list[str]:
        """READY, RELOADING, STOPPING messages, in order (no STATUS= or EXTEND_TIMEOUT_USEC=)."""
        return [n.kind for n in self.notes if n.kind not in ("status", "extend")]

    def start(self) -> None:
        self.feed(lc.Start())
        self.ready_all()

    def exit_all(self, status: int = 0) -> None:
        for wid in self.workers():
            self.feed(lc.Exited(wid, status))

    def kill(self, worker: int) -> None:
        self.feed(lc.Exited(worker, -signal.SIGKILL))
