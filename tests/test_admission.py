"""The admission controller's algorithm, driven by an injected clock: the Gradient2 limit,
the CoDel queue (deadline, LIFO under sustained overload), priorities, the per-client
bucket and the shedding summaries."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable

import pytest

from sdserve.admission import (
    CALM_WINDOWS,
    CLIENT_RATE,
    LIMIT,
    QUEUE_DEADLINE,
    WINDOW_SAMPLES,
    Admission,
    Gradient2,
    Priority,
    Settings,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.timers: list[tuple[float, Callable[[], None]]] = []

    def __call__(self) -> float:
        return self.now

    def schedule(self, delay: float, fn: Callable[[], None]) -> None:
        self.timers.append((self.now + delay, fn))

    def advance(self, seconds: float) -> None:
        """Move time on, running the timers that fall due, in order."""
        end = self.now + seconds
        while True:
            due = [t for t in self.timers if t[0] <= end]
            if not due:
                break
            first = min(due, key=lambda t: t[0])
            self.timers.remove(first)
            self.now = max(self.now, first[0])
            first[1]()
        self.now = end


def make(clock: Clock, **settings: object) -> Admission:
    return Admission(Settings(**settings), clock=clock, schedule=clock.schedule)  # type: ignore[arg-type]


def serve_window(adm: Admission, clock: Clock, concurrency: int, rtt: float, n: int = 20) -> None:
    """``n`` requests, ``concurrency`` at a time, each taking ``rtt`` (one window or more)."""
    for _ in range(max(1, n // concurrency)):
        started = []
        for _ in range(concurrency):
            clock.now += 0.00001
            assert adm.admit(clock.now) is None
            started.append(clock.now)
        clock.now += rtt
        for at in started:
            adm.release(at)
    clock.now += 0.1


def test_a_latency_jump_lowers_the_limit_and_its_end_raises_it_again() -> None:
    g = Gradient2(20, 4, 1000)
    for _ in range(30):  # 2 ms at a concurrency that uses the limit: it grows
        g.update(0.002, int(g.limit))
    grown = g.limit
    assert grown > 20
    seen = [g.update(0.2, int(g.limit)) for _ in range(40)]  # the dependency slows down
    assert all(b <= a for a, b in itertools.pairwise(seen))
    assert g.limit < grown / 4
    low = g.limit
    for _ in range(10):  # fast again, and little load: back to the initial limit
        g.update(0.002, 1)
    assert g.limit > low
    assert g.limit == pytest.approx(20)


def test_an_application_limited_window_does_not_raise_the_limit() -> None:
    g = Gradient2(20, 4, 1000)
    for _ in range(50):
        g.update(0.002, 3)
    assert g.limit == 20


@pytest.mark.asyncio
async def test_past_the_limit_requests_wait_then_get_in_fifo() -> None:
    clock = Clock()
    adm = make(clock, initial_limit=4, min_limit=4, queue_size=8)
    for _ in range(4):
        assert adm.admit(clock.now) is None
    waiting = [adm.admit(clock.now) for _ in range(3)]
    assert all(isinstance(w, asyncio.Future) for w in waiting)
    assert adm.queue_length == 3
    clock.now += 0.001
    adm.release(clock.now - 0.001)  # one ends: the oldest gets its slot
    assert [w.done() for w in waiting] == [True, False, False]  # type: ignore[union-attr]
    assert waiting[0].result() is None  # type: ignore[union-attr]
    assert adm.inflight == 4
    assert adm.queued == 1


@pytest.mark.asyncio
async def test_a_full_queue_refuses_at_once_and_nothing_is_both_queued_and_refused() -> None:
    clock = Clock()
    adm = make(clock, initial_limit=4, min_limit=4, queue_size=2)
    for _ in range(4):
        adm.admit(clock.now)
    queued = [adm.admit(clock.now), adm.admit(clock.now)]
    assert adm.admit(clock.now) == LIMIT
    assert adm.rejected == {LIMIT: 1}
    for _ in range(4):
        clock.now += 0.001
        adm.release(clock.now - 0.001)
    assert [q.result() for q in queued] == [None, None]  # type: ignore[union-attr]
    assert adm.expired == 0
    assert adm.admitted == 6
    assert adm.queued == 2


@pytest.mark.asyncio
async def test_a_request_that_would_wait_past_the_deadline_is_refused_on_arrival() -> None:
    clock = Clock()
    adm = make(clock, initial_limit=4, min_limit=4, queue_size=100)
    serve_window(adm, clock, 4, 0.05)  # the service time is 50 ms
    for _ in range(4):
        adm.admit(clock.now)
    # the queue drains 4 requests per 50 ms: 8 fit in the 100 ms deadline, the 9th not
    got = [adm.admit(clock.now) for _ in range(9)]
    assert sum(isinstance(g, asyncio.Future) for g in got) == 7
    assert got[-2:] == [QUEUE_DEADLINE, QUEUE_DEADLINE]


@pytest.mark.asyncio
async def test_a_request_already_late_when_read_is_refused_before_its_handler() -> None:
    clock = Clock()
    adm = make(clock)
    assert adm.admit(clock.now - 0.2) == QUEUE_DEADLINE  # waited 200 ms for the loop
    assert adm.admit(clock.now - 0.05) is None  # 50 ms: within the interval
    assert adm.inflight == 1


def one_queued(clock: Clock) -> tuple[Admission, asyncio.Future[str | None]]:
    """A limit of 2 reached by two requests whose handlers do not end, and a third queued."""
    adm = make(clock, initial_limit=2, min_limit=2, max_limit=2)
    adm.admit(clock.now)
    adm.admit(clock.now)
    waiting = adm.admit(clock.now)
    assert isinstance(waiting, asyncio.Future)
    return adm, waiting


@pytest.mark.asyncio
async def test_queued_requests_whose_handlers_never_end_are_refused_at_the_deadline() -> None:
    clock = Clock()
    adm, waiting = one_queued(clock)
    clock.advance(0.099)
    assert not waiting.done()
    clock.advance(0.002)
    assert waiting.result() == QUEUE_DEADLINE
    assert adm.expired == 1
    assert adm.queue_length == 0


@pytest.mark.asyncio
async def test_a_deadline_timer_run_early_by_the_loop_is_armed_again() -> None:
    """uvloop runs a timer up to a millisecond early by time.monotonic(): the queued
    request is refused once its deadline is really past, not left waiting forever."""
    clock = Clock()
    adm, waiting = one_queued(clock)
    ((due, fire),) = clock.timers
    clock.timers.clear()
    clock.now = due - 0.0006  # the loop runs it 0.6 ms early
    fire()
    assert not waiting.done()  # not yet past its deadline
    assert len(clock.timers) == 1  # and a timer for it again
    clock.advance(0.001)
    assert waiting.result() == QUEUE_DEADLINE
    assert adm.expired == 1


@pytest.mark.asyncio
async def test_sustained_overload_shortens_the_deadline_and_serves_newest_first() -> None:
    clock = Clock()
    adm = make(clock, initial_limit=2, min_limit=2, max_limit=2, queue_size=50)
    serve_window(adm, clock, 2, 0.001, n=40)
    started = [clock.now, clock.now]
    adm.admit(clock.now)
    adm.admit(clock.now)
    first = adm.admit(clock.now)
    assert isinstance(first, asyncio.Future)
    # two arrive for each one served: the queue never empties, overloaded after 100 ms
    for _ in range(15):
        clock.now += 0.008
        adm.release(started.pop())
        started.append(clock.now)
        adm.admit(clock.now - 0.0001)
        adm.admit(clock.now - 0.0001)
    assert adm.overloaded(clock.now)
    assert adm.admit(clock.now - 0.006) == QUEUE_DEADLINE  # 6 ms > the 5 ms target
    a = adm.admit(clock.now)
    b = adm.admit(clock.now)
    assert isinstance(a, asyncio.Future)
    assert isinstance(b, asyncio.Future)
    adm.release(started.pop())
    assert b.done()
    assert not a.done()
    clock.advance(0.006)  # the older one misses its 5 ms deadline
    assert a.result() == QUEUE_DEADLINE


@pytest.mark.asyncio
async def test_sheddable_goes_first_critical_last() -> None:
    clock = Clock()
    adm = make(
        clock,
        initial_limit=2,
        min_limit=2,
        max_limit=2,
        critical_paths=("/pay",),
        sheddable_paths=("/report",),
        priority_header="X-Priority",
    )
    assert adm.priority_of("/pay/now", None) is Priority.CRITICAL
    assert adm.priority_of("/report/x", None) is Priority.SHEDDABLE
    assert adm.priority_of("/report/x", "critical") is Priority.CRITICAL
    assert adm.priority_of("/", None) is Priority.NORMAL
    # a sheddable request is held to the target even while not overloaded
    assert adm.admit(clock.now - 0.01, Priority.SHEDDABLE) == QUEUE_DEADLINE
    assert adm.admit(clock.now - 0.01, Priority.NORMAL) is None
    adm.admit(clock.now)
    assert adm.admit(clock.now, Priority.SHEDDABLE) == LIMIT  # never queued
    normal = adm.admit(clock.now)
    assert isinstance(normal, asyncio.Future)
    assert adm.admit(clock.now, Priority.CRITICAL) is None  # past the adaptive limit
    assert adm.inflight == 3


@pytest.mark.asyncio
async def test_critical_requests_queue_ahead_at_the_hard_cap() -> None:
    clock = Clock()
    adm = Admission(Settings(), hard_cap=2, clock=clock, schedule=clock.schedule)
    adm.admit(clock.now)
    adm.admit(clock.now)
    normal = adm.admit(clock.now)
    critical = adm.admit(clock.now, Priority.CRITICAL)
    assert isinstance(normal, asyncio.Future)
    assert isinstance(critical, asyncio.Future)
    adm.release(clock.now)
    assert critical.done()
    assert not normal.done()


def test_a_client_over_its_rate_is_refused() -> None:
    clock = Clock()
    adm = make(clock, client_rate=10, client_burst=3)
    got = [adm.admit(clock.now, client="10.0.0.1") for _ in range(5)]
    assert got == [None, None, None, CLIENT_RATE, CLIENT_RATE]
    assert adm.admit(clock.now, client="10.0.0.2") is None  # another client
    clock.now += 0.1  # one token back
    assert adm.admit(clock.now, client="10.0.0.1") is None
    assert adm.admit(clock.now, client="10.0.0.1") == CLIENT_RATE


def test_shedding_is_announced_summarised_at_most_every_interval_and_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    adm = make(clock, log_interval=5.0)
    changes: list[bool] = []
    adm.on_shedding = changes.append
    caplog.set_level(logging.INFO, logger="sdserve.admission")
    for _ in range(8):  # refusals every 0.5 s for 4 s
        adm.admit(clock.now - 1.0)
        clock.advance(0.5)
    assert changes == [True]
    clock.advance(6.0)
    assert changes == [True, False]
    summaries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("shed ")]
    assert len(summaries) == 1
    assert "shed 8 request(s)" in summaries[0]
    assert "queue_deadline 8" in summaries[0]
    assert adm.rejected == {QUEUE_DEADLINE: 8}


def test_bad_overload_settings_are_errors_naming_the_key() -> None:
    from sdserve.config import ConfigError, load_config

    env = {
        "SDSERVE_OVERLOAD__MIN_LIMIT": "50",
        "SDSERVE_OVERLOAD__MAX_LIMIT": "10",
        "SDSERVE_OVERLOAD__QUEUE_INTERVAL": "1ms",
        "SDSERVE_OVERLOAD__CRITICAL_PATHS": "pay",
        "SDSERVE_OVERLOAD__PRIORITY_HEADER": "X Priority",
    }
    with pytest.raises(ConfigError) as err:
        load_config(environ=env)
    text = str(err.value)
    assert "overload.max_limit: must be at least overload.min_limit (50)" in text
    assert "overload.queue_interval: must be at least overload.queue_target" in text
    assert "overload.critical_paths: a path prefix must start with '/', got 'pay'" in text
    assert "overload.priority_header: must be a header name" in text
    cfg = load_config(environ={"SDSERVE_MAX_CONCURRENCY": "8"})
    assert not cfg.overload.enabled  # off by default (see its doc)
    assert cfg.overload.initial_limit == 20


def test_max_concurrency_stays_a_hard_cap_over_the_adaptive_limit() -> None:
    clock = Clock()
    adm = Admission(Settings(initial_limit=20, max_limit=1000), hard_cap=8, clock=clock)
    assert adm.limit == 8
    for _ in range(200):
        adm.gradient.update(0.002, 1000)
    assert adm.gradient.limit == 8


def test_the_wait_for_the_loop_counts_this_processs_work_not_the_hosts() -> None:
    clock = Clock()
    cpu = [5.0]
    adm = Admission(Settings(), clock=clock, cpu_clock=lambda: cpu[0], schedule=clock.schedule)
    # read 300 ms ago (the host ran other processes), 2 ms of this process's work since
    cpu[0] += 0.002
    assert adm.admit(clock.now - 0.3, work_since=5.0) is None
    # read 200 ms ago, and 150 ms of work for the requests ahead of it since: past the
    # deadline
    cpu[0] += 0.15
    assert adm.admit(clock.now - 0.2, work_since=5.0) == QUEUE_DEADLINE
    # 150 ms of work, but read 50 ms ago (other threads of the process): the wait is
    # 50 ms, within the deadline
    assert adm.admit(clock.now - 0.05, work_since=5.0) is None


class Loop:
    """Turns of an event loop serving handlers that do not await, as aiohttp does: a
    request read in one turn (first offered to ``shed_on_read``, as the protocol does)
    reaches admission two turns later (its connection's task, then its handler's), and
    runs ``cost`` of CPU time in the turn it is admitted in, or in the next one when it
    was woken from the queue."""

    def __init__(self, clock: Clock, cost: float, **settings: object) -> None:
        self.clock = clock
        self.cpu = 0.0
        self.cost = cost
        self.adm = Admission(
            Settings(**settings),  # type: ignore[arg-type]
            clock=clock,
            cpu_clock=lambda: self.cpu,
            schedule=clock.schedule,
        )
        self.reading: list[list[float]] = [[], []]  # read two turns ago, one turn ago
        self.woken: list[asyncio.Future[str | None]] = []
        self.outcomes: list[str] = []

    def run(self) -> None:
        at = self.clock.now
        self.cpu += self.cost
        self.clock.now += self.cost
        self.adm.release(at)
        self.outcomes.append("admitted")

    def turn(self, arrivals: int) -> list[str | None]:
        """One turn; returns what shed_on_read said of each of its ``arrivals``."""
        for future in self.woken:
            if future.done() and future.result() is None:
                self.run()
            elif future.done():
                self.outcomes.append(str(future.result()))
        self.woken = [f for f in self.woken if not f.done()]
        for arrived in self.reading.pop(0):
            got = self.adm.admit(arrived)
            if got is None:
                self.run()
            elif isinstance(got, str):
                self.outcomes.append(got)
            else:
                self.woken.append(got)
        said = []
        read: list[float] = []
        for _ in range(arrivals):
            self.clock.now += 0.00002  # reading and parsing
            early = self.adm.shed_on_read(self.clock.now)
            said.append(early)
            if early is None:
                read.append(self.clock.now)
            else:
                self.outcomes.append(early)
        self.reading.append(read)
        # the callbacks made soon (call_soon) in this turn run in the next one, and
        # what they make soon in the turn after
        due = [t for t in self.clock.timers if t[0] <= self.clock.now]
        for timer in due:
            self.clock.timers.remove(timer)
            timer[1]()
        return said


@pytest.mark.asyncio
async def test_under_sustained_overload_a_turn_admits_what_its_cpu_budget_fits() -> None:
    """Handlers of 1 ms CPU, 3 arriving per turn: past the interval, each turn admits one
    (the loop reads between two handlers) and the rest is refused as it is read, before
    any task; the queue's wait stays within the 5 ms target."""
    loop = Loop(Clock(), cost=0.001)
    for _ in range(100):  # past the 100 ms interval, and long enough to measure a turn
        loop.turn(3)
    adm = loop.adm
    assert adm.overloaded(loop.clock.now)
    assert adm.pacing
    assert adm.per_turn == 1
    assert adm.cost == pytest.approx(0.001, rel=0.2)
    assert adm.turn == pytest.approx(0.00106, rel=0.2)
    said = [loop.turn(3) for _ in range(20)]
    early = sum(s is not None for turn in said for s in turn)
    assert 30 <= early <= 45  # two of three, about: refused as read
    assert all(s in (None, QUEUE_DEADLINE) for turn in said for s in turn)
    # the handlers ran one per turn in those 20 turns, and what waits fits the target
    assert loop.outcomes[-60:].count("admitted") in (19, 20, 21)
    assert adm.queue_length * adm.turn <= adm.settings.queue_target


@pytest.mark.asyncio
async def test_handlers_that_await_are_not_held_to_one_a_turn() -> None:
    """A handler that costs 20 us of CPU (the rest is awaiting I/O): a turn fits 50 of
    them in its budget, so sustained load is not paced below what the loop can do."""
    loop = Loop(Clock(), cost=0.00002)
    for _ in range(400):
        loop.turn(10)
    adm = loop.adm
    assert adm.overloaded(loop.clock.now)
    assert adm.per_turn >= 20
    said = [loop.turn(10) for _ in range(10)]
    assert all(s is None for turn in said for s in turn)
    assert loop.outcomes[-100:] == ["admitted"] * 100


def test_a_refusal_as_read_only_while_paced_and_never_for_critical_requests() -> None:
    clock = Clock()
    adm = make(clock, queue_size=3)
    assert adm.shed_on_read(clock.now) is None  # not paced: admission decides
    adm.pacing = True
    assert adm.shed_on_read(clock.now) is None  # paced, but not a sustained overload
    clock.now += 0.2  # not idle for two intervals
    adm.turn, adm.per_turn = 0.0001, 1
    # the reads not yet at admission count ahead, up to the queue's size
    assert [adm.shed_on_read(clock.now) for _ in range(4)] == [None, None, None, LIMIT]
    assert adm.shed_on_read(clock.now, Priority.CRITICAL) is None
    assert adm.shed_on_read(clock.now, Priority.SHEDDABLE) == QUEUE_DEADLINE
    assert adm.shed_on_read_count == 2
    assert adm.rejected == {LIMIT: 1, QUEUE_DEADLINE: 1}
    # the next turn is paced too: it had reads; those still count ahead in it
    adm._next_turn()
    assert adm.pacing
    assert adm.shed_on_read(clock.now) == LIMIT
    # a turn with no read let through and nothing admitted is still paced while the
    # reads of the one before have not reached admission (two turns on); a second such
    # turn ends the pacing (an idle loop does not spin): admission decides again
    adm._next_turn()
    assert adm.pacing
    adm._next_turn()
    assert not adm.pacing
    assert adm.shed_on_read(clock.now) is None
    assert adm.shed_on_read_count == 3


def test_the_bookkeeping_engages_under_pressure_and_disengages_after_calm_windows() -> None:
    clock = Clock()
    adm = make(clock, initial_limit=20)
    assert not adm.engaged  # nothing to do while the worker keeps up
    assert (adm.engage_wait, adm.engage_inflight) == (0.005, 10)
    adm.engage(adopted=3)  # three requests in flight let in before: counted from now
    assert adm.engaged
    assert adm.inflight == 3
    assert adm.engagements == 1
    for _ in range(3):
        clock.now += 0.001
        adm.release(clock.now - 0.002)
    assert adm.inflight == 0
    # a request that waited past half the target in a window: not calm, the count
    # of calm windows starts again
    serve_window(adm, clock, 2, 0.002)
    assert adm.admit(clock.now - 0.004) is None
    adm.release(clock.now)
    serve_window(adm, clock, 2, 0.002)
    assert adm.engaged
    assert adm._calm == 0
    for _ in range(CALM_WINDOWS - 1):
        serve_window(adm, clock, 2, 0.002)
    assert adm.engaged  # one window short
    serve_window(adm, clock, 2, 0.002)
    assert not adm.engaged
    # paced turns alone are not: one client that sends its next request at once looks
    # like a saturated loop, and its requests wait for nothing
    adm.engage()
    adm.pacing = True
    for _ in range(CALM_WINDOWS):
        serve_window(adm, clock, 2, 0.002)
    assert not adm.engaged
    adm.pacing = False
    # a refusal in a window is pressure
    adm.engage()
    for _ in range(CALM_WINDOWS - 1):
        serve_window(adm, clock, 2, 0.002)
    adm._refuse(LIMIT)
    serve_window(adm, clock, 2, 0.002)
    assert adm.engaged
    assert adm._calm == 0


def test_a_rate_per_client_keeps_the_bookkeeping_engaged() -> None:
    clock = Clock()
    adm = make(clock, client_rate=100)
    assert adm.engaged
    for _ in range(CALM_WINDOWS * 2):
        serve_window(adm, clock, 2, 0.002)
    assert adm.engaged


def test_latencies_timed_while_disengaged_are_the_baseline_a_slow_dependency_is_seen_against() -> (
    None
):
    clock = Clock()
    adm = make(clock, initial_limit=20)
    for _ in range(40):  # 2 ms, sampled: the baseline, and the limit did not move
        for _ in range(WINDOW_SAMPLES):
            clock.now += 0.01
            adm.sample(clock.now - 0.002)
    assert not adm.engaged
    assert adm.limit == 20
    assert adm.gradient.long_rtt == pytest.approx(0.002)
    adm.engage()  # the dependency slows: many in flight
    serve_window(adm, clock, 20, 0.2)
    assert adm.limit < 20  # lowered from the first slow window
