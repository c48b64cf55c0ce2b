"""Checks at run time: re-runs continuous checks in the background after READY=1.

Interface used by the worker: ``CheckMonitor(state, registry, health_config,
notifier)``, ``start()`` right after READY=1, ``await stop()`` when the drain begins
(the loop heartbeat goes on until the worker is stopped, or ``close()``).

- Each continuous check has one task that runs it every ``interval`` (the check's
  own, else ``health.interval``). Runs of one check never overlap: the task waits
  for each run, :func:`sdserve.checks.run_check` bounds it by the check's timeout,
  and a run that ignored cancellation blocks new runs of that check until it ends
  (they fail at once meanwhile). Probes only read the results kept in
  :class:`sdserve.state.WorkerState`; nothing a probe does starts a run.
- Readiness has hysteresis: a critical check takes readiness away after
  ``health.fail_threshold`` consecutive failures and gives it back after
  ``health.pass_threshold`` consecutive successes. ``STATUS=`` follows.
- Liveness is about sdserve only: a timer callback (no thread, no task) ticks
  every ``min(loop_stall / 4, 1s)`` and records how late it ran. A tick that comes
  more than ``health.loop_stall`` late is a stall; the health endpoints report it
  while it lasts (when a probe gets through at all) and for ``health.stall_hold``
  after the loop recovered, so a prober whose probes timed out during the stall
  sees it on its next probe.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Callable

from .checks import Check, CheckRegistry, CheckResult, run_check
from .config import HealthConfig
from .notify import Notifier
from .state import Phase, WorkerState

log = logging.getLogger("sdserve.monitor")

#: the heartbeat never ticks less often than this
MAX_TICK = 1.0


def tick_period(config: HealthConfig) -> float:
    """How often the event-loop heartbeat ticks."""
    return min(config.loop_stall / 4, MAX_TICK)


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
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._period = tick_period(config)
        self._due = 0.0
        self._last_status: str | None = None
        #: more for STATUS=, after the health (the worker's shedding); "" says nothing
        self.also: Callable[[], str] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the heartbeat and one background task per continuous check."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        self.state.loop.last_tick = now
        self._due = now + self._period
        self._timer = loop.call_later(self._period, self._tick)
        for check in self.registry.checks.values():
            if check.continuous:
                task = loop.create_task(
                    self._run_forever(check), name=f"sdserve-check:{check.name}"
                )
                task.add_done_callback(self._task_ended)
                self._tasks[check.name] = task
        # READY=1 carries the first STATUS=; from here on STATUS= follows the checks
        self._last_status = self.status_text()

    async def stop(self) -> None:
        """Stop the background runs and wait for their tasks to end (the drain begins).

        The heartbeat goes on through the drain, so that ``/livez`` still tells a
        stalled loop from a working one; it ends with the worker (phase
        ``stopped``) or :meth:`close`. A check run that ignores cancellation is
        abandoned (see :func:`sdserve.checks.run_check`); stop() does not wait for it.
        """
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def close(self) -> None:
        """Stop the heartbeat too."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    @property
    def tasks(self) -> tuple[asyncio.Task[None], ...]:
        """The background check tasks (one per continuous check)."""
        return tuple(self._tasks.values())

    @property
    def running(self) -> int:
        """Background check tasks still running."""
        return sum(1 for t in self._tasks.values() if not t.done())

    # -- heartbeat -----------------------------------------------------------------------

    def _tick(self) -> None:
        now = time.monotonic()
        loop_state = self.state.loop
        lag = max(0.0, now - self._due)
        loop_state.lag = lag
        loop_state.max_lag = max(loop_state.max_lag, lag)
        if lag > self.config.loop_stall:
            gap = now - (loop_state.last_tick or now)
            loop_state.stall = (now, gap)
            loop_state.stall_wall = time.time()
            log.error(
                "the event loop was stalled for %.1fs (limit %.1fs): liveness fails for %.0fs",
                gap,
                self.config.loop_stall,
                self.config.stall_hold,
                extra={"SDSERVE_PHASE": "liveness", "SDSERVE_STALL_MS": round(gap * 1000)},
            )
        loop_state.last_tick = now
        if self.state.phase is Phase.STOPPED:
            self._timer = None
            return
        self._due = now + self._period
        self._timer = asyncio.get_running_loop().call_later(self._period, self._tick)

    # -- checks --------------------------------------------------------------------------

    async def _run_forever(self, check: Check) -> None:
        loop = asyncio.get_running_loop()
        interval = check.interval if check.interval is not None else self.config.interval
        next_run = loop.time() + interval
        while True:
            await asyncio.sleep(max(0.0, next_run - loop.time()))  # the schedule itself
            result = await run_check(check, self.registry)
            self.apply(check, result)
            next_run += interval
            if next_run < loop.time():  # runs took longer than the interval: skip, don't burst
                next_run = loop.time() + interval

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:  # pragma: no cover - the loop never returns
            return
        error = self.registry.redact(f"{task.get_name()} crashed: {type(exc).__name__}: {exc}")
        self.state.monitor_error = error
        trace = self.registry.redact("".join(traceback.format_exception(exc)))
        log.error(
            "the check monitor broke (liveness fails from now on): %s\n%s",
            error,
            trace.rstrip(),
            extra={"SDSERVE_PHASE": "liveness"},
        )

    def apply(self, check: Check, result: CheckResult) -> None:
        """Record one result and move readiness if a threshold was crossed."""
        name = check.name
        before = self.state.results.get(name)
        self.state.record([result])
        streak = self.state.streaks[name]
        fields = {
            "SDSERVE_PHASE": "monitor",
            "SDSERVE_CHECK": name,
            "SDSERVE_CHECK_OK": int(result.ok),
            "SDSERVE_DURATION_MS": round(result.duration * 1000, 1),
        }
        if not result.ok and (before is None or before.ok):
            log.warning("check %s failed: %s", name, result.output, extra=fields)
        elif result.ok and before is not None and not before.ok:
            log.info("check %s passes again", name, extra=fields)
        changed = before is None or before.ok != result.ok
        if check.critical:
            if name not in self.state.unready and streak <= -self.config.fail_threshold:
                self.state.unready.add(name)
                changed = True
                log.error(
                    "not ready: critical check %s failed %d time(s) in a row: %s",
                    name,
                    -streak,
                    result.output,
                    extra=fields,
                )
            elif name in self.state.unready and streak >= self.config.pass_threshold:
                self.state.unready.discard(name)
                changed = True
                log.info(
                    "critical check %s passed %d time(s) in a row%s",
                    name,
                    streak,
                    "" if self.state.unready else ": ready again",
                    extra=fields,
                )
        if changed:
            self._update_status()

    def status_text(self) -> str:
        """The STATUS= line that describes the current health."""
        results = self.state.results
        if self.state.unready:
            parts = [
                f"{n} (recovering)" if results[n].ok else f"{n} ({results[n].output or 'failed'})"
                for n in sorted(self.state.unready)
            ]
            text = "not ready: " + ", ".join(parts) + " failing"
        else:
            text = "ready"
        degraded = sorted(n for n, r in results.items() if not r.ok and n not in self.state.unready)
        if degraded:
            text += "; failing: " + ", ".join(degraded)
        return self.registry.redact(text)

    def refresh_status(self) -> None:
        """Send STATUS= again if what it says changed (the worker started or stopped
        shedding)."""
        self._update_status()

    def _update_status(self) -> None:
        if self.state.phase is not Phase.READY:
            return  # starting: the start-up gate reports; draining: the worker does
        text = self.status_text()
        if self.also is not None and (more := self.also()):
            text += f"; {more}"
        if text != self._last_status:
            self._last_status = text
            self.notifier.status(text)
