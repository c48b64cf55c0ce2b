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
    CLIENT_RATE,
    LIMIT,
    QUEUE_DEADLINE,
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


@pytest.mark.asyncio
async def test_queued_requests_whose_handlers_never_end_are_refused_at_the_deadline() -> None:
    clock = Clock()
    adm = make(clock, initial_limit=2, min_limit=2, max_limit=2)
    adm.admit(clock.now)
    adm.admit(clock.now)
    waiting = adm.admit(clock.now)
    assert isinstance(waiting, asyncio.Future)
    clock.advance(0.099)
    assert not waiting.done()
    clock.advance(0.002)
    assert waiting.result() == QUEUE_DEADLINE
    assert adm.expired == 1
    assert adm.queue_length == 0


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
    assert not cfg.overload.enabled  # off by default until the benchmark says otherwise
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
    # 150 ms of work for the requests ahead of it: past the deadline
    cpu[0] += 0.15
    assert adm.admit(clock.now, work_since=5.0) == QUEUE_DEADLINE
