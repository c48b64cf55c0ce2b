"""A canary reload: the new code serves beside the old and is judged before it replaces it.

The judgement and the state machine are tested directly; then, with real workers under
load, a release that passes its checks but answers 500, one that is 10x slower, and a
good one: the first two are rolled back (only the canary's own answers fail), the last
completes.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sdserve import lifecycle as lc
from sdserve.canary import RequestStats, Thresholds, judge, quantile
from sdserve.exitcodes import ExitCode
from tests.conftest import MakeSupervised
from tests.helpers import HOST, read_response, request_bytes, write_app
from tests.lifecycle_driver import Driver, config

LIMITS = Thresholds(min_requests=50, error_margin=0.02, latency_factor=3.0)


def stats(ok: int, errors: int = 0, seconds: float = 0.002) -> RequestStats:
    out = RequestStats()
    for _ in range(ok):
        out.record(200, seconds)
    for _ in range(errors):
        out.record(500, seconds)
    return out


# -- the judgement ---------------------------------------------------------------------------


def test_errors_decide_as_soon_as_the_canary_has_enough_requests() -> None:
    old = stats(1000, errors=5)
    assert judge(old, stats(0, errors=49), LIMITS, final=False) is None  # too few yet
    verdict = judge(old, stats(0, errors=50), LIMITS, final=False)
    assert verdict is not None
    assert not verdict.ok
    assert "5xx 100.0% against 0.5%" in verdict.reason


def test_latency_decides_by_the_p99() -> None:
    old = stats(1000, seconds=0.020)
    assert quantile(old, 0.99) == pytest.approx(0.0226, rel=0.01)
    slow = judge(old, stats(100, seconds=0.200), LIMITS, final=False)
    assert slow is not None
    assert not slow.ok
    assert "p99" in slow.reason
    # 2x slower is within the factor: no failure, and a pass only at the end
    assert judge(old, stats(100, seconds=0.040), LIMITS, final=False) is None
    passed = judge(old, stats(100, seconds=0.040), LIMITS, final=True)
    assert passed is not None
    assert passed.ok


def test_too_little_traffic_completes_and_says_so() -> None:
    verdict = judge(stats(10), stats(3), LIMITS, final=True)
    assert verdict is not None
    assert verdict.ok
    assert "too little traffic to judge (3 canary requests, 50 wanted)" in verdict.reason


def test_stats_travel_as_text() -> None:
    s = stats(7, errors=2, seconds=0.3)
    assert RequestStats.decode(s.encode()) == s
    with pytest.raises(ValueError, match="not request stats"):
        RequestStats.decode("1,2,3")


# -- the state machine -----------------------------------------------------------------------


def _canary_reload(workers: int = 3) -> Driver:
    d = Driver(config(workers=workers, canary_workers=1, canary_watch=30))
    d.start()
    d.feed(lc.ReloadAsked(7, "sdserve reload"))
    return d


def test_a_canary_starts_alone_and_is_watched_once_ready() -> None:
    d = _canary_reload()
    assert d.workers(generation=2) == [4]  # one canary, not three
    out = d.feed(lc.Ready(4))
    watch = [a for a in out if isinstance(a, lc.WatchCanary)]
    assert watch == [lc.WatchCanary(2, 1, 30.0)]
    assert d.workers(lc.WState.READY, generation=1) == [1, 2, 3]  # the old ones serve on
    assert d.phase() is lc.Phase.WARMING


def test_a_passed_canary_lets_the_rest_start_then_switches() -> None:
    d = _canary_reload()
    d.feed(lc.Ready(4))
    d.feed(lc.CanaryVerdict(2, True, "fine"))
    assert d.workers(generation=2) == [4, 5]  # warmup_parallel = 1: one at a time
    d.ready_all(2)
    assert d.phase() is lc.Phase.SWITCHING
    assert d.workers(lc.WState.RETIRING, generation=1) == [1, 2, 3]
    d.exit_all()
    assert d.replies[-1].verdict == "ok"


def test_a_failed_canary_is_rolled_back_and_the_reload_fails() -> None:
    d = _canary_reload()
    d.feed(lc.Ready(4))
    d.feed(lc.CanaryVerdict(2, False, "5xx 100.0% against 0.0%"))
    assert d.phase() is lc.Phase.ABORTING
    assert d.core.workers[4].state is lc.WState.RETIRING  # drains, connections handed over
    assert d.workers(lc.WState.READY, generation=1) == [1, 2, 3]
    d.feed(lc.Exited(4, 0))
    assert d.phase() is lc.Phase.RUNNING
    reply = d.replies[-1]
    assert reply.verdict == "failed"
    assert "canary rolled back: 5xx 100.0% against 0.0%" in reply.text


def test_a_verdict_after_a_stop_is_ignored_and_options_override_the_config() -> None:
    d = Driver(config(workers=2))
    d.start()
    d.feed(lc.ReloadAsked(7, "sdserve reload", canary=1, watch=5.0))
    out = d.feed(lc.Ready(3))
    assert [a for a in out if isinstance(a, lc.WatchCanary)] == [lc.WatchCanary(2, 1, 5.0)]
    d.feed(lc.StopAsked("SIGTERM"))
    assert d.feed(lc.CanaryVerdict(2, True, "late")) == []
    assert d.phase() is lc.Phase.STOPPING


# -- with real workers -----------------------------------------------------------------------

#: what the releases add to relapp's create_app: answers that pass every check, but
#: are all 500, or 10x slower than the old code's
SERVES_500 = """\
    @web.middleware
    async def broken(request, handler):
        return web.Response(status=500, text=f"{VERSION} {os.getpid()} broken\\n")

    app.middlewares.append(broken)
"""
TEN_TIMES_SLOWER = """\
    import asyncio

    @web.middleware
    async def slower(request, handler):
        await asyncio.sleep(0.18)
        return await handler(request)

    app.middlewares.append(slower)
"""

#: the load: new connections (so that they split between old and new workers), 20 ms each
PATH = "/slow?ms=20"
CLIENTS = 8


@dataclass
class Load:
    """Clients that open a connection per request and never retry; bounded by time."""

    port: int
    #: (version, status) of every answer, in order
    answers: list[tuple[str, int]] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    _waiting: list[tuple[int, asyncio.Future[None]]] = field(default_factory=list)

    def answered(self, count: int) -> asyncio.Future[None]:
        """Done once ``count`` answers in all have come back."""
        done = asyncio.get_running_loop().create_future()
        self._waiting.append((count, done))
        self._wake()
        return done

    def _wake(self) -> None:
        for count, done in self._waiting:
            if len(self.answers) >= count and not done.done():
                done.set_result(None)

    async def client(self, deadline: float) -> None:
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                reader, writer = await asyncio.open_connection(HOST, self.port)
                try:
                    writer.write(request_bytes(PATH, close=True))
                    response = await asyncio.wait_for(read_response(reader), 10)
                finally:
                    writer.close()
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                self.errors[type(exc).__name__] += 1
                continue
            self.answers.append((response.body.decode().split(" ")[0], response.status))
            self._wake()

    async def run(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(self.client(deadline) for _ in range(CLIENTS)))


@dataclass
class Outcome:
    code: int
    out: str
    took: float
    during: Counter[tuple[str, int]]
    after: Counter[tuple[str, int]]
    errors: Counter[str]


async def canary_under_load(
    supervised: MakeSupervised, port: int, appdir: Path, release: str, watch: float
) -> Outcome:
    """v1 on 2 workers under load, then ``sdserve reload --canary 1`` to v2 (``release``)."""
    launcher = supervised("--canary-min-requests", "30", workers=2)
    await launcher.start()
    load = Load(port)
    running = asyncio.ensure_future(load.run(120))
    try:
        await asyncio.wait_for(load.answered(100), 30)  # the old code serves under load
        write_app(appdir, "v2", release)
        mark = len(load.answers)
        began = time.monotonic()
        code, out = await launcher.reload_command("--canary", "1", "--watch", f"{watch:g}")
        took = time.monotonic() - began
        during = Counter(load.answers[mark:])
        mark = len(load.answers)
        await asyncio.wait_for(load.answered(mark + 100), 30)  # who answers now
        after = Counter(load.answers[mark:])
    finally:
        load.stop.set()
        await running
    assert await launcher.stop() == ExitCode.OK
    print(f"\n{out}during: {dict(during)}; after: {dict(after)}; errors: {dict(load.errors)}")
    return Outcome(code, out, took, during, after, load.errors)


def decided_after(out: str) -> float:
    found = re.search(r"after (\d+\.\d)s", out)
    assert found is not None, out
    return float(found.group(1))


@pytest.mark.asyncio
@pytest.mark.parametrize("release", ["serves-500", "10x-slower"])
async def test_a_bad_but_healthy_release_is_rolled_back_under_load(
    supervised: MakeSupervised, port: int, tmp_path: Path, release: str
) -> None:
    extra = SERVES_500 if release == "serves-500" else TEN_TIMES_SLOWER
    result = await canary_under_load(supervised, port, tmp_path / "app", extra, watch=30)
    assert result.code == 1, result.out
    assert "canary rolled back: " in result.out
    assert ("5xx 100.0%" if release == "serves-500" else "p99") in result.out
    # decided long before the watch ended, and only the canary's own answers failed
    assert decided_after(result.out) < 10, result.out
    assert result.errors == Counter()
    failed = {k: n for k, n in result.during.items() if k[1] != 200}
    assert set(failed) <= {("v2", 500)}, result.during
    assert set(result.after) == {("v1", 200)}, result.after  # the old code serves alone


@pytest.mark.asyncio
async def test_a_good_release_completes_after_its_watch(
    supervised: MakeSupervised, port: int, tmp_path: Path
) -> None:
    result = await canary_under_load(supervised, port, tmp_path / "app", "", watch=2)
    assert result.code == 0, result.out
    assert "canary passed: canary: " in result.out
    assert decided_after(result.out) >= 2
    assert result.errors == Counter()
    assert all(status == 200 for _, status in result.during), result.during
    assert result.during[("v2", 200)] > 0  # the canary served beside the old code
    assert set(result.after) == {("v2", 200)}, result.after
