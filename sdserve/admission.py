"""Admission control under overload: an adaptive concurrency limit, a bounded wait queue
with a CoDel-style queue-time deadline, priorities, and an optional token bucket per client.

Why: a fixed ``max_concurrency`` is hard to choose and wrong as soon as the handler's cost
or the host changes; below it every request is admitted however long the queue behind it
grows, so under overload every client waits and most miss their deadline (goodput falls
to nothing while the CPU is busy). This module keeps the work admitted near what the
worker can finish in time and answers the rest at once with 503 and ``Retry-After``.

**The limit: Gradient2**, as in Netflix's concurrency-limits (``Gradient2Limit``).
Each window (at least ``WINDOW`` seconds and ``WINDOW_SAMPLES`` responses) gives the
average latency of the requests admitted in it (from admission to the handler's end,
without their wait in the queue). A long-term average (an exponential average over
``LONG_WINDOW`` windows) is the baseline. Then::

    gradient = clamp(TOLERANCE * long / short, 0.5, 1.0)
    new      = limit * gradient + sqrt(limit)           # sqrt(limit): headroom to probe
    limit    = limit * (1 - SMOOTHING) + new * SMOOTHING, within [min_limit, max_limit]

so latency that rises above 1.5x its baseline lowers the limit at once, and latency at
baseline lets it grow by about ``0.2 * sqrt(limit)`` a window. A window in which the
worker used less than half its limit does not raise it past ``initial_limit`` (the
application, not the limit, decided the concurrency), but a limit lowered earlier
doubles back towards ``initial_limit`` in such a window while latency is at its
baseline: when the load falls, the limit rises again. When the short latency falls far
below the baseline (the dependency recovered) the baseline decays towards it.

Why Gradient2 rather than the others: Vegas estimates the queue from the *minimum*
latency ever seen, so a lasting change of the handler's cost (a slow dependency: 2 ms
to 200 ms) looks like a queue forever and drives the limit to its floor until a probe
resets the minimum; AIMD only reacts to drops or timeouts, which here come after the
damage (the latency the clients already saw); Envoy's adaptive concurrency is a
gradient too, but measures its baseline in periodic windows at a pinned minimal limit,
which sheds traffic on purpose every few seconds. Gradient2 needs no such probe, reacts
within a window to a latency jump, follows a lasting change through its long average,
and costs O(1) per response.

**The queue: CoDel, with adaptive LIFO**, as Facebook describes it ("Fail at Scale",
2015). A request beyond the limit may wait in a bounded queue (``queue_size``). Its
allowed wait is ``queue_interval`` (100 ms) normally, and ``queue_target`` (5 ms) once
the worker has not been idle for a whole interval (sustained overload); in that state
the queue is served newest first (LIFO), so the requests served are those whose clients
are still waiting, and the oldest are the ones that miss. A request that *would* wait
past its deadline is refused on arrival (its expected wait is the queue ahead of it
times the mean service time over the limit): a request that has entered the queue is
served, unless the handlers slow down or stop while it waits: then it is refused at
its deadline, by one timer for the whole queue (counted in :attr:`Admission.expired`).

**Admissions paced by turns of the loop under sustained overload.** A handler that
does not await runs its whole course in one step of the loop, so a limit on requests
*in flight* never binds for it: every request read in one turn would run in the next,
one after the other, and the loop would not read its sockets again until all had run.
Under sustained overload sdserve therefore paces the admissions by turns: a turn admits as
many normal requests as fit in a fifth of ``queue_target`` of CPU time (measured: the
CPU time of a turn over the requests it admitted; one, for a handler of 1 ms and the
default 5 ms target), the others wait in the queue, served newest first. The loop then
reads its sockets every millisecond or so, and a request that cannot be served in time
is refused as soon as it is read (:meth:`Admission.shed_on_read`): its expected wait is
the requests ahead of it (queued, or read and not yet at admission) times the measured
length of a turn over the admissions per turn. Such a refusal costs no task and no
request object, and it leaves within about one turn. A handler that awaits (I/O) costs
little CPU per request, so many fit in a turn and the pacing does not hold it back.

The wait counts from the moment the request's bytes were read: in one event loop a
handler that does not await (CPU work) runs to its end before the next starts, so the
queue of a saturated worker is mostly implicit, requests read and waiting for the loop.
A request that has already waited past its deadline there is refused before its
handler, for the price of a 503 instead of the handler's. Past the deadline, that wait
counts no more than the worker's CPU time meanwhile (the work done for the requests
ahead of it): on a host whose CPUs are shared, the time the kernel gives to other
processes is no queue that refusing requests would shorten, and counting it refused
requests the worker had the time to serve (measured: on a 2-core host at load average
8, wall-time waits shed 94% at 3x and kept goodput at 18% of capacity).

**Priorities.** Health probes, the admin socket and WebSocket upgrades (a session that
lives as long as its client: neither held nor timed) never reach this module; a stream
of server-sent events (as long-lived) is released as its headers go out, timed to them
(:meth:`sdserve.drain.Tracker.prepared`). A path prefix (``critical_paths``,
``sheddable_paths``) or a header (``priority_header``: ``critical``, ``normal`` or
``sheddable``) marks a request. Sheddable requests are never queued, are held to
``queue_target`` even when not overloaded, and are refused outright under sustained
overload; critical ones ignore the adaptive limit (``max_concurrency``, the hard cap,
still holds), queue ahead of the others and are allowed ``queue_interval``.

**Per client**: with ``client_rate`` set, a token bucket per client address
(``request.remote``) refuses a client past its rate (``client_rate``) and burst.

Every refusal is counted in :attr:`Admission.rejected` by reason: ``limit`` (the limit
was reached and the queue was full), ``queue_deadline`` (it waited, or would have
waited, past the queue's deadline), ``client_rate``. While it refuses requests the
worker is *shedding*: :attr:`Admission.on_shedding` hears when that starts and ends (the
worker says so in ``STATUS=``), and a summary goes to the journal at most every
``log_interval``.

**Engaged only under pressure.** The bookkeeping above costs a hello-world handler about
a tenth of its throughput, for nothing while the worker keeps up. So it is *engaged*
only when a request waited ``queue_target`` for the loop after its bytes were read, or
when half the limit is in flight; before that a request is let in and counted, no more,
and one every :data:`SAMPLE_GAP` (or ``queue_target``) is timed, so that Gradient2's
baseline is the latency of the calm service (a dependency that slows down later is seen
as slower). The requests already in flight when it engages are counted from then on,
so the limit and ``max_concurrency`` hold at once. It disengages after
:data:`CALM_WINDOWS` windows in a row with no sign of pressure: no request queued or
refused, none that waited more than half the target, less than half the limit in
flight. A rate per client keeps it engaged.

Cost: engaged, an admitted request with nobody queued costs a few comparisons and
additions, no allocation and no task; a queued one costs one future. Not engaged, a
clock read and a counter.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

log = logging.getLogger("sdserve.admission")

#: the reasons a request is refused
LIMIT = "limit"
QUEUE_DEADLINE = "queue_deadline"
CLIENT_RATE = "client_rate"
REASONS = (LIMIT, QUEUE_DEADLINE, CLIENT_RATE)

# Gradient2's constants (Netflix's defaults, but a window of 100 ms: a worker's latency
# is measured in milliseconds, and the limit must follow a jump within a second)
WINDOW = 0.1
WINDOW_SAMPLES = 10
LONG_WINDOW = 600
TOLERANCE = 1.5
SMOOTHING = 0.2
#: the worker counts as idle when the loop read a request this long after the last
#: response ended (a saturated loop reads its next batch right after the last handler)
IDLE_GAP = 0.0005
#: clients remembered by the token buckets before the full (idle) ones are forgotten
MAX_CLIENTS = 4096
#: while not engaged, a request is timed (for the limit's baseline latency) if it began
#: this long (or ``queue_target``, if longer) after the last one timed: twice the
#: samples a window needs, at any rate
SAMPLE_GAP = WINDOW / (2 * WINDOW_SAMPLES)
#: windows in a row without a sign of pressure before the bookkeeping disengages
CALM_WINDOWS = 10


class Priority(IntEnum):
    CRITICAL = 0
    NORMAL = 1
    SHEDDABLE = 2


PRIORITY_NAMES = {p.name.lower(): p for p in Priority}
# module constants: no attribute look-up on the class per request
CRITICAL = Priority.CRITICAL
NORMAL = Priority.NORMAL
SHEDDABLE = Priority.SHEDDABLE


@dataclass(frozen=True)
class Settings:
    """What :class:`Admission` needs of the configuration (``[overload]``)."""

    initial_limit: int = 20
    min_limit: int = 4
    max_limit: int = 1000
    queue_size: int = 128
    queue_target: float = 0.005
    queue_interval: float = 0.1
    critical_paths: tuple[str, ...] = ()
    sheddable_paths: tuple[str, ...] = ()
    priority_header: str = ""
    client_rate: int = 0
    client_burst: int = 0
    log_interval: float = 10.0


class Gradient2:
    """The limit (see the module docstring). ``update`` is called once per window."""

    def __init__(self, initial: float, low: float, high: float) -> None:
        self.low = low
        self.high = high
        self.limit = min(max(initial, low), high)
        self.initial = self.limit
        self.long_rtt = 0.0
        self._windows = 0

    def update(self, short_rtt: float, max_inflight: int) -> float:
        if short_rtt <= 0:
            return self.limit
        self._windows += 1
        if self._windows <= 10:  # warm-up: a plain average of the first windows
            self.long_rtt += (short_rtt - self.long_rtt) / self._windows
        else:
            self.long_rtt += (short_rtt - self.long_rtt) * (2.0 / (LONG_WINDOW + 1))
        if self.long_rtt / short_rtt > 2.0:
            self.long_rtt *= 0.95  # latency fell for good: follow it down
        gradient = max(0.5, min(1.0, TOLERANCE * self.long_rtt / short_rtt))
        if max_inflight < self.limit / 2:
            # application-limited: no evidence for a higher limit, only for a lower one;
            # a limit lowered earlier comes back towards the initial one (slow start)
            if gradient >= 1.0 and self.limit < self.initial:
                self.limit = min(self.limit * 2, self.initial)
            return self.limit
        new = self.limit * gradient + math.sqrt(self.limit)
        new = self.limit * (1 - SMOOTHING) + new * SMOOTHING
        self.limit = min(max(new, self.low), self.high)
        return self.limit


class Admission:
    """Decides, per request, admit now, queue, or refuse; O(1) per request.

    ``clock`` is monotonic seconds (the event loop's time); ``schedule(delay, fn)`` runs
    ``fn`` later (the loop's ``call_later`` by default). Both are injectable for tests.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        hard_cap: int = 0,
        clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] = time.process_time,
        schedule: Callable[[float, Callable[[], None]], object] | None = None,
    ) -> None:
        s = self.settings = settings
        high = float(min(s.max_limit, hard_cap) if hard_cap else s.max_limit)
        low = float(min(s.min_limit, high))
        self.hard_cap = hard_cap
        self.gradient = Gradient2(float(s.initial_limit), low, high)
        self.clock = clock
        #: the process's CPU time (see :meth:`admit`)
        self.cpu_clock = cpu_clock
        #: whether a request's path or header can change its priority (else all normal)
        self.classifies = bool(s.critical_paths or s.sheddable_paths or s.priority_header)
        #: every request is normal and no client has a rate: admit needs no more than
        #: the times (the request path's usual case)
        self.plain = not self.classifies and not s.client_rate
        self._schedule = schedule
        #: refusals by reason, since the start (for the metrics)
        self.rejected: Counter[str] = Counter()
        self.admitted = 0
        #: of those admitted, how many waited in the queue first
        self.queued = 0
        self.inflight = 0
        #: the limit as a whole number (admission compares against it)
        self.limit = int(self.gradient.limit)
        # engaged only under pressure (see the module docstring): a rate per client is
        # kept at all times
        self.always = bool(s.client_rate)
        #: the bookkeeping is on: every request goes through :meth:`admit`
        self.engaged = self.always
        #: a request that waited this long for the loop, or this many requests in
        #: flight, engage it
        self.engage_wait = s.queue_target
        self.engage_inflight = max(1, self.limit // 2)
        #: how many times it engaged, and windows in a row with no sign of pressure
        self.engagements = 0
        self._calm = 0
        #: when the last request timed while not engaged began (time.monotonic()), and
        #: the time between two such
        self.timed_at = 0.0
        self.sample_gap = max(SAMPLE_GAP, s.queue_target)
        # the queue: (deadline, future) newest last; a future's result is None when the
        # request is admitted, or the reason it is refused
        self._critical: deque[tuple[float, asyncio.Future[str | None]]] = deque()
        self._normal: deque[tuple[float, asyncio.Future[str | None]]] = deque()
        #: when the timer that expires queued requests fires (0: none pending)
        self._expiry_due = 0.0
        #: the number of the last expiry timer armed (see :meth:`_expire`)
        self._expiry_timer = 0
        #: queued requests refused at their deadline (the expected wait was wrong: the
        #: handlers slowed down, or none ended)
        self.expired = 0
        # the current window of Gradient2
        self._window_start = clock()
        self._window_sum = 0.0
        self._window_n = 0
        self._window_max = 0
        #: the longest wait for the loop in the window, and the refusals before it began
        self._window_wait = 0.0
        self._window_refused = 0
        #: refusals since the start, all reasons
        self._refused = 0
        #: mean service time (admission to end), for the expected wait in the queue
        self.service = 0.0
        #: the last time the worker was idle (nothing queued, the loop not saturated)
        self._last_idle = clock()
        #: the last time a request was decided or ended (the loop was busy then): for a
        #: request :meth:`admit` just let in, when it was admitted
        self.last_busy = 0.0
        # the turns of the loop under sustained overload (see the module docstring):
        #: the CPU time a turn may admit (a fifth of the target: the loop reads often)
        self.turn_budget = s.queue_target / 5
        #: requests admitted in this turn of the loop, and how many a turn may admit
        #: (0: not measured yet, no cap)
        self._turn_admitted = 0
        self.per_turn = 0
        #: a call of :meth:`_next_turn` is pending (the turns are being paced)
        self.pacing = False
        #: when the current turn began, on the clock and in CPU time (0: not measured)
        self._turn_at = 0.0
        self._turn_cpu = 0.0
        #: the mean length of a turn while paced, and CPU time per admitted request
        self.turn = 0.0
        self.cost = 0.0
        #: requests read in this turn and in the last (not yet at admission)
        self._reads = 0
        self._reads_before = 0
        #: refusals decided as the request was read (:meth:`shed_on_read`)
        self.shed_on_read_count = 0
        # per client token buckets: address -> [tokens, last refill]
        self._buckets: dict[str, list[float]] = {}
        rate = s.client_rate
        self._burst = float(s.client_burst or rate)
        # shedding: refusals since the last tick and since the last summary
        self.shedding = False
        self.on_shedding: Callable[[bool], None] | None = None
        self._tick_due = False
        self._since_tick = 0
        self._since_log: Counter[str] = Counter()
        self._last_log = clock()

    # -- the request path ---------------------------------------------------------------

    def overloaded(self, now: float) -> bool:
        """Sustained overload: the worker has not been idle for a whole interval."""
        return now - self._last_idle > self.settings.queue_interval

    def priority_of(self, path: str, header: str | None) -> Priority:
        s = self.settings
        if header:
            found = PRIORITY_NAMES.get(header.strip().lower())
            if found is not None:
                return found
        if s.critical_paths and path.startswith(s.critical_paths):
            return Priority.CRITICAL
        if s.sheddable_paths and path.startswith(s.sheddable_paths):
            return Priority.SHEDDABLE
        return Priority.NORMAL

    def admit(
        self,
        arrived: float,
        priority: Priority = Priority.NORMAL,
        client: str | None = None,
        work_since: float | None = None,
    ) -> str | asyncio.Future[str | None] | None:
        """None: admitted (call :meth:`release` at its end); a string: refused for that
        reason; a future: queued, and its result is one of those two (on cancellation,
        call :meth:`abandon`).

        ``arrived`` is the clock when the request's bytes were read; ``work_since`` the
        process's CPU time then (:attr:`cpu_clock`): the wait before admission is then
        the work this process did meanwhile, not the time the host gave to others."""
        now = self.clock()
        s = self.settings
        if arrived - self.last_busy > IDLE_GAP and not (self._normal or self._critical):
            self._last_idle = now  # read after the loop had nothing left to do
        self.last_busy = now
        if s.client_rate and client is not None and not self._take_token(client, now):
            return self._refuse(CLIENT_RATE)
        overloaded = now - self._last_idle > s.queue_interval
        waited = now - arrived
        if waited > self._window_wait:  # noqa: PLR1730 (no call: the request path)
            self._window_wait = waited
        if priority is CRITICAL:
            deadline = s.queue_interval
        elif priority is SHEDDABLE:
            if overloaded:
                return self._refuse(QUEUE_DEADLINE)
            deadline = s.queue_target
        else:
            deadline = s.queue_target if overloaded else s.queue_interval
        if waited > deadline and work_since is not None:
            # the wall time includes what the host gave to others: count the work done
            # for the requests ahead (a clock read only for a request that waited)
            waited = min(waited, self.cpu_clock() - work_since)
        if waited > deadline:
            return self._refuse(QUEUE_DEADLINE)
        inflight = self.inflight
        if priority is CRITICAL:
            free = not self.hard_cap or inflight < self.hard_cap
        else:
            free = inflight < self.limit and not self._critical and not self._normal
            if free and overloaded:
                free = not self.per_turn or self._turn_admitted < self.per_turn
                if free:
                    self._take_turn()
        if free:
            self.inflight = inflight + 1
            self.admitted += 1
            if inflight >= self._window_max:
                self._window_max = inflight + 1
            return None
        # full: wait in the queue, if it has room and the wait fits the deadline
        if priority is SHEDDABLE:
            return self._refuse(LIMIT)
        queue = self._critical if priority is CRITICAL else self._normal
        if len(self._critical) + len(self._normal) >= s.queue_size:
            return self._refuse(LIMIT)
        # the requests served before this one: those ahead in FIFO; under overload (LIFO)
        # only the critical ones, the newest being next
        ahead = len(self._critical)
        if queue is self._normal and not overloaded:
            ahead += len(self._normal)
        if (ahead + 1) * self._slot() > deadline - waited:
            return self._refuse(QUEUE_DEADLINE)
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        queue.append((arrived, future))
        self._arm_expiry(now)
        return future

    def shed_on_read(self, now: float, priority: Priority = Priority.NORMAL) -> str | None:
        """A request just read, while the turns are paced: the reason to refuse it now,
        before any task or request object exists, or None (it goes on to :meth:`admit`,
        which decides again, with its client's rate too). Its expected wait is the
        requests ahead of it, queued or read and not yet at admission, times a turn."""
        if not self.pacing or priority is CRITICAL:
            return None
        s = self.settings
        if now - self._last_idle <= s.queue_interval:
            return None  # not (or no longer) a sustained overload
        if priority is SHEDDABLE:
            self.shed_on_read_count += 1
            return self._refuse(QUEUE_DEADLINE)
        ahead = len(self._critical) + len(self._normal) + self._reads + self._reads_before
        if ahead >= s.queue_size:
            reason = LIMIT
        elif (ahead + 1) * self._slot() > s.queue_target:
            reason = QUEUE_DEADLINE
        else:
            self._reads += 1
            return None
        self.shed_on_read_count += 1
        return self._refuse(reason)

    def _slot(self) -> float:
        """The expected wait per request ahead in the queue: the service time over the
        limit, or while the turns are paced a turn's length over its admissions."""
        per = self.service / max(self.limit, 1)
        if self.pacing and self.per_turn:
            return max(per, self.turn / self.per_turn)
        return per

    def _take_turn(self) -> None:
        """A request is admitted in this turn (under sustained overload); the turns are
        paced from now on, until a turn admits nothing and lets no read through."""
        self._turn_admitted += 1
        if not self.pacing:
            self.pacing = True
            if not self._turn_at:
                self._turn_at = self.clock()
                self._turn_cpu = self.cpu_clock()
            self._soon(self._next_turn)

    def _next_turn(self) -> None:
        """A new turn of the loop (called once per turn while paced): measure the last
        one, and admit the next queued requests, newest first."""
        now = self.clock()
        cpu = self.cpu_clock()
        if self._turn_at:
            length = now - self._turn_at
            self.turn += (length - self.turn) * 0.1 if self.turn else length
            if self._turn_admitted:
                each = (cpu - self._turn_cpu) / self._turn_admitted
                self.cost += (each - self.cost) * 0.1 if self.cost else each
                self.per_turn = max(1, int(self.turn_budget / max(self.cost, 1e-9)))
        # the last turn admitted or read requests, or the one before read some (a request
        # reaches admission two turns after its read: its connection's task, then its
        # handler's): the next one is paced too, even if nothing is queued now. Two turns
        # without any end the pacing: an idle loop does not spin
        active = self._turn_admitted or self._reads or self._reads_before
        self._turn_at = now
        self._turn_cpu = cpu
        self._turn_admitted = 0
        self._reads_before, self._reads = self._reads, 0
        self.pacing = False
        if self._critical or self._normal:
            self._wake(now)  # paces on when it admits one under sustained overload
        if not self.pacing and active and self.overloaded(now):
            self.pacing = True
            self._soon(self._next_turn)
        if not self.pacing:
            self._turn_at = 0.0  # the next paced turn is measured from its own start
            self._reads_before = 0

    def _soon(self, fn: Callable[[], None]) -> None:
        if self._schedule is not None:
            self._schedule(0.0, fn)
        else:
            asyncio.get_running_loop().call_soon(fn)

    def _deadline(self, now: float, critical: bool) -> float:
        """How long a queued request of the normal or the critical queue may wait now."""
        s = self.settings
        if critical or now - self._last_idle <= s.queue_interval:
            return s.queue_interval
        return s.queue_target

    def _next_expiry(self, now: float) -> float:
        """When the oldest queued request runs out of time (0: nothing queued)."""
        nearest = 0.0
        for queue, critical in ((self._critical, True), (self._normal, False)):
            if queue:
                when = queue[0][0] + self._deadline(now, critical)
                if not nearest or when < nearest:
                    nearest = when
        return nearest

    def _arm_expiry(self, now: float) -> None:
        when = self._next_expiry(now)
        if when and (not self._expiry_due or when < self._expiry_due):
            self._expiry_due = when
            self._expiry_timer += 1
            self._later(max(when - now, 0.0), functools.partial(self._expire, self._expiry_timer))

    def _expire(self, timer: int) -> None:
        """The queue's deadline: refuse the queued requests whose wait ran out (the
        oldest first: under overload, the deadline shrinks to the target for all).

        ``timer`` tells the timers apart: only the last one armed acts (the others were
        superseded by an earlier deadline). Not the clock: a loop may run a timer early
        by its own clock's measure (uvloop's, of whole milliseconds, by up to a
        millisecond), and then nothing expires yet and the timer is armed again."""
        if timer != self._expiry_timer:
            return
        now = self.clock()
        self._expiry_due = 0.0
        for queue, critical in ((self._critical, True), (self._normal, False)):
            limit = self._deadline(now, critical)
            while queue and queue[0][0] + limit <= now:  # as _next_expiry computes it
                _, future = queue.popleft()
                if not future.done():
                    self.expired += 1
                    future.set_result(self._refuse(QUEUE_DEADLINE))
        self._arm_expiry(now)

    def release(self, admitted_at: float) -> None:
        """An admitted request ended (``admitted_at``: the clock when it was admitted)."""
        now = self.clock()
        self.last_busy = now
        self.inflight -= 1
        self._record(now, now - admitted_at)
        if self._critical or self._normal:
            self._wake(now)

    def sample(self, began: float) -> None:
        """A request let in while not engaged, and timed (one every :data:`SAMPLE_GAP`:
        ``began`` is the clock at its start), ended: its latency keeps the limit's
        baseline and the service time current."""
        now = self.clock()
        self._record(now, now - began)

    def _record(self, now: float, rtt: float) -> None:
        self.service += (rtt - self.service) * 0.05 if self.service else rtt
        self._window_sum += rtt
        self._window_n += 1
        if now - self._window_start >= WINDOW and self._window_n >= WINDOW_SAMPLES:
            self._end_window(now)

    def _end_window(self, now: float) -> None:
        """A window of Gradient2 is complete: a new limit; and, engaged, whether the
        window showed pressure (or the bookkeeping may disengage)."""
        limit = self.gradient.update(self._window_sum / self._window_n, self._window_max)
        self.limit = max(1, int(limit))
        self.engage_inflight = max(1, self.limit // 2)
        if self.engaged and not self.always:
            # (not whether the turns are paced: one client that sends its next request
            # at once looks like a saturated loop; a real overload shows in the waits)
            calm = (
                not self._critical
                and not self._normal
                and self._window_max < self.engage_inflight
                and self._window_wait <= self.engage_wait / 2
                and self._refused == self._window_refused
            )
            self._calm = self._calm + 1 if calm else 0
            if self._calm >= CALM_WINDOWS:
                self.engaged = False
                log.debug("admission bookkeeping off: no pressure for %d windows", CALM_WINDOWS)
        self._window_start = now
        self._window_sum = 0.0
        self._window_n = 0
        self._window_max = self.inflight
        self._window_wait = 0.0
        self._window_refused = self._refused

    def engage(self, adopted: int = 0) -> None:
        """Pressure: from now on every request goes through :meth:`admit`. ``adopted``:
        requests in flight let in before, counted from now on (each will be released)."""
        self.engaged = True
        self._calm = 0
        self.engagements += 1
        self.inflight += adopted
        self._window_max = max(self._window_max, self.inflight)
        log.debug("admission bookkeeping on: %d in flight", self.inflight)

    def abandon(self, future: asyncio.Future[str | None]) -> None:
        """A queued request went away (its client left, its task was cancelled)."""
        if future.done() and not future.cancelled():
            if future.result() is None:
                self.release(self.clock())  # it had been given a slot: give it back
            return
        for queue in (self._critical, self._normal):
            for item in queue:
                if item[1] is future:
                    queue.remove(item)
                    return

    def _wake(self, now: float) -> None:
        lifo = self.overloaded(now)
        served = False
        while (self._critical or self._normal) and self.inflight < self.limit:
            if lifo and self.per_turn and self._turn_admitted >= self.per_turn:
                break  # this turn's share under sustained overload: the next goes on
            queue = self._critical if self._critical else self._normal
            arrived, future = queue.pop() if lifo else queue.popleft()
            if future.done():
                continue  # cancelled meanwhile
            if now - arrived > self._deadline(now, queue is self._critical):
                self.expired += 1
                future.set_result(self._refuse(QUEUE_DEADLINE))
                continue
            future.set_result(None)
            served = True
            self.inflight += 1
            self.admitted += 1
            self.queued += 1
            if lifo:
                self._take_turn()
        if served and not lifo and not self._critical and not self._normal:
            # the queue emptied by serving (not by its deadline). Not under sustained
            # overload: the turns are paced then, and refusals as read keep the queue
            # short, so it empties by serving while the loop is never idle (a read
            # long after the last busy moment says when it is: admit)
            self._last_idle = now

    # -- per client -----------------------------------------------------------------------

    def _take_token(self, client: str, now: float) -> bool:
        rate = float(self.settings.client_rate)
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= MAX_CLIENTS:
                self._forget_idle_clients(now)
            self._buckets[client] = [self._burst - 1.0, now]
            return True
        tokens = min(self._burst, bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def _forget_idle_clients(self, now: float) -> None:
        """Drop the buckets that are full again (their client left); if none, the oldest."""
        rate = float(self.settings.client_rate)
        full = [
            c for c, (t, last) in self._buckets.items() if t + (now - last) * rate >= self._burst
        ]
        for client in full:
            del self._buckets[client]
        if len(self._buckets) >= MAX_CLIENTS:
            for client in list(self._buckets)[: MAX_CLIENTS // 4]:
                del self._buckets[client]

    # -- visibility -------------------------------------------------------------------------

    def _refuse(self, reason: str) -> str:
        self._refused += 1
        self.rejected[reason] += 1
        self._since_log[reason] += 1
        self._since_tick += 1
        if not self.shedding:
            self.shedding = True
            log.warning(
                "shedding load: refusing requests (%s); concurrency limit %d, %d in flight",
                reason,
                self.limit,
                self.inflight,
                extra={"SDSERVE_PHASE": "overload", "SDSERVE_LIMIT": reason},
            )
            if self.on_shedding is not None:
                self.on_shedding(True)
        if not self._tick_due:
            self._tick_due = True
            self._later(1.0, self.tick)
        return reason

    def _later(self, delay: float, fn: Callable[[], None]) -> None:
        if self._schedule is not None:
            self._schedule(delay, fn)
        else:
            asyncio.get_running_loop().call_later(delay, fn)

    def tick(self) -> None:
        """Once a second while shedding: a summary at most every ``log_interval``; the end
        of the shedding after a second without a refusal."""
        self._tick_due = False
        now = self.clock()
        refused, self._since_tick = self._since_tick, 0
        ended = refused == 0
        if self._since_log and (ended or now - self._last_log >= self.settings.log_interval):
            self.log_summary(now)
        if ended:
            self.shedding = False
            log.info(
                "no longer shedding load; concurrency limit %d",
                self.limit,
                extra={"SDSERVE_PHASE": "overload"},
            )
            if self.on_shedding is not None:
                self.on_shedding(False)
            return
        self._tick_due = True
        self._later(1.0, self.tick)

    def log_summary(self, now: float) -> None:
        counts, self._since_log = self._since_log, Counter()
        took = now - self._last_log
        self._last_log = now
        log.warning(
            "shed %d request(s) in the last %.0f s (%s); concurrency limit %d",
            sum(counts.values()),
            took,
            ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
            self.limit,
            extra={
                "SDSERVE_PHASE": "overload",
                **{f"SDSERVE_SHED_{k.upper()}": str(v) for k, v in counts.items()},
            },
        )

    def status_text(self) -> str:
        """For ``STATUS=`` while shedding."""
        return f"shedding load (concurrency limit {self.limit})"

    def snapshot(self) -> dict[str, object]:
        """The controller's state, for ``sdserve status`` and the metrics."""
        return {
            "limit": self.limit,
            "inflight": self.inflight,
            "queued_now": len(self._critical) + len(self._normal),
            "admitted": self.admitted,
            "queued": self.queued,
            "expired": self.expired,
            "shed_on_read": self.shed_on_read_count,
            "rejected": dict(self.rejected),
            "shedding": self.shedding,
            "engaged": self.engaged,
            "engagements": self.engagements,
        }

    @property
    def queue_length(self) -> int:
        return len(self._critical) + len(self._normal)
