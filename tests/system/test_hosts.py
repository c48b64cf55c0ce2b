"""Three hosts behind a real HAProxy (issue 17, part 2): one host at a time is restarted,
reloaded, or taken out and put back, under drill load through HAProxy with no retries: 0
failed requests. Then one host's box is killed outright: only the requests in flight on it
and those HAProxy sent it before it noticed fail, and none once HAProxy retries safely.

Each host is a systemd box (252, Debian 12's own) in a network namespace of the test's, with
the shipped units and ``drain_delay`` set by the rule of ``units/LOADBALANCER.md``:
longer than HAProxy's ``inter`` x ``fall`` + ``timeout check``. The drill runs on this
machine against HAProxy on 127.0.0.1 (see ``hosts.py``). A step of a rolling operation
starts when HAProxy has reported the previous host UP again (its log is the event). The
drill lasts a fixed time, sized for a loaded machine: each test asserts that its operation
ended at least a second before the load did.

Last, two boxes in one network namespace: each ``systemctl reload`` reaches its own service
(the control socket's name carries the PID namespace).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
import subprocess
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from sdserve.drill import Action, DrillResult, DrillSpec, Schedule, Target, run_drill
from sdserve.drill.outcome import classify

from .conftest import put_figure
from .hosts import UNITS, Checks, HAProxy, Host, haproxy, hosts_in_namespaces
from .test_systemd import SERVICE, main_pid
from .testbed import message

FLAVOUR = "252"
CHECKS = Checks()
#: twice the longest HAProxy takes to see a host's /readyz fail (the rule, with its margin)
DRAIN_DELAY = round(2 * CHECKS.down_window, 2)
#: the drill's load: open loop, half the requests on keep-alive connections
RATE = 500.0
PATH = "slow?ms=10"
#: a step waits this long at most for HAProxy to see a host go DOWN or come back UP
STATE_TIMEOUT = 30.0

pytestmark = [pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def hosts(testbed: None) -> Iterator[list[Host]]:
    with hosts_in_namespaces(FLAVOUR, 3, DRAIN_DELAY, CHECKS.down_window) as hs:
        yield hs


def record(name: str, value: str) -> None:
    put_figure(FLAVOUR, f"hosts: {name}", value)


def drill(
    proxy: HAProxy,
    duration: float,
    step: Callable[[], str],
    at: float = 1.0,
    progress: list[str] | None = None,
) -> DrillResult:
    """The drill through HAProxy for ``duration`` s, running ``step`` (blocking: in a thread)
    ``at`` s in. The step must end a second before the load does; ``progress`` is what it
    did so far (shown if it fails)."""

    async def act() -> str:
        return await asyncio.to_thread(step)

    spec = DrillSpec(
        targets=(Target(proxy.url + PATH),),
        duration=duration,
        rate=RATE,
        keepalive=0.5,
        processes=1,
        timeout=5.0,
    )
    action = Action("step", act, Schedule(times=1, start=at), timeout=duration - at - 1.0)
    result = asyncio.run(run_drill(spec, [action]))
    assert result.errors == []
    [rec] = result.actions
    assert proxy.log is not None
    changes = "\n".join(f"{c.at - result.t0:.2f} s: {c.text.strip()}" for c in proxy.log.changes)
    done = "; ".join(progress or [])
    assert rec.ok, f"{rec.detail} (done: {done}); HAProxy's state changes:\n{changes}"
    assert rec.end <= result.duration - 1.0, (
        f"the step ended at {rec.end:.1f} s, too close to the load's end "
        f"({result.duration:.1f} s): the test's duration is too short for this machine"
    )
    return result


def summary(result: DrillResult) -> str:
    counts = result.counts()
    failed = {k: v for k, v in counts["classes"].items() if k != "success" and v}
    return f"{result.requests} requests in {result.duration:.1f} s, {result.failures} failed" + (
        f" {failed} {counts['status_5xx']}" if failed else ""
    )


def assert_no_failures(result: DrillResult, proxy: HAProxy) -> None:
    assert result.requests >= 0.9 * RATE * result.spec.duration
    assert result.not_sent == 0
    assert result.failures == 0, summary(result) + "\n" + proxy.stop()


def rolling(
    proxy: HAProxy,
    hosts: list[Host],
    op: Callable[[Host], None],
    progress: list[str],
    *,
    leaves: bool,
) -> str:
    """``op`` on each host in turn, saying each step in ``progress``. ``leaves``: the host
    must be seen DOWN by HAProxy during ``op``, and the next host waits until it is UP
    again. Without: HAProxy must not see any change of state at all."""
    assert proxy.log is not None
    log = proxy.log
    for h in hosts:
        mark = log.mark()
        began = time.monotonic()
        op(h)
        took = f"{h.name}: {op.__name__} {time.monotonic() - began:.2f} s"
        if leaves:
            down = log.wait(h.name, "DOWN", after=mark, timeout=STATE_TIMEOUT)
            up = log.wait(h.name, "UP", after=mark, timeout=STATE_TIMEOUT)
            assert down.at < up.at
            progress.append(f"{took}, out of rotation {up.at - down.at:.2f} s")
        else:
            assert log.since(mark) == [], [c.text for c in log.since(mark)]
            progress.append(f"{took}, in rotation throughout")
    return "; ".join(progress)


def drain_delay_warnings(h: Host, cursor: str | None = None) -> list[str]:
    """What sdserve said about its drain_delay (sdserve.loadbalancer) in the host's journal."""
    entries = h.running.journal(cursor=cursor, unit=SERVICE)
    return [message(e) for e in entries if e.get("SDSERVE_PHASE") == "drain-delay"]


def restart(h: Host) -> None:
    h.running.systemctl("restart", SERVICE)


def reload(h: Host) -> None:
    h.running.systemctl("reload", SERVICE)


def stop_start(h: Host) -> None:
    """The host leaves (its sockets close: maintenance, a reboot) and comes back."""
    h.running.systemctl("stop", *UNITS)
    assert h.running.show(SERVICE, "ActiveState")["ActiveState"] == "inactive"
    h.running.systemctl("start", *UNITS)


# ---- one host at a time: 0 failed ---------------------------------------------------------


def test_rolling_restart_through_haproxy_loses_nothing(
    hosts: list[Host], tmp_path_factory: pytest.TempPathFactory
) -> None:
    with haproxy(hosts, tmp_path_factory.mktemp("haproxy")) as proxy:
        steps: list[str] = []
        result = drill(
            proxy, 32.0, lambda: rolling(proxy, hosts, restart, steps, leaves=True), progress=steps
        )
        assert_no_failures(result, proxy)
    record("rolling restart (3 hosts)", f"{summary(result)}; {result.actions[0].detail}")


def test_rolling_reload_through_haproxy_loses_nothing(
    hosts: list[Host], tmp_path_factory: pytest.TempPathFactory
) -> None:
    with haproxy(hosts, tmp_path_factory.mktemp("haproxy")) as proxy:
        steps: list[str] = []
        result = drill(
            proxy, 30.0, lambda: rolling(proxy, hosts, reload, steps, leaves=False), progress=steps
        )
        assert_no_failures(result, proxy)
    record("rolling reload (3 hosts)", f"{summary(result)}; {result.actions[0].detail}")


def test_rolling_stop_and_start_through_haproxy_loses_nothing(
    hosts: list[Host], tmp_path_factory: pytest.TempPathFactory
) -> None:
    with haproxy(hosts, tmp_path_factory.mktemp("haproxy")) as proxy:
        steps: list[str] = []
        result = drill(
            proxy,
            40.0,
            lambda: rolling(proxy, hosts, stop_start, steps, leaves=True),
            progress=steps,
        )
        assert_no_failures(result, proxy)
    record("rolling stop + start (3 hosts)", f"{summary(result)}; {result.actions[0].detail}")


def test_a_host_that_leaves_without_drain_delay_fails_requests(
    hosts: list[Host], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The control: the same stop and start of one host, with ``drain_delay = 0``. The host
    stops accepting before HAProxy has seen its /readyz fail: what HAProxy sends it meanwhile
    is refused (with no retries, a 503), and the connections in its sockets' queues are reset
    when the sockets close."""
    h = hosts[0]
    h.configure(0.0)
    cursor = h.running.cursor()
    h.running.systemctl("restart", SERVICE)  # the running instance reads it at its start
    # sdserve knows the window (lb_check_window) and says the setting breaks the rule
    said = drain_delay_warnings(h, cursor)
    assert len(said) == 1, said
    assert said[0].startswith(
        f"drain_delay (0s) is shorter than lb_check_window ({CHECKS.down_window:g}s)"
    ), said
    # and only there: the hosts that keep the rule have never been warned
    for other in hosts[1:]:
        assert drain_delay_warnings(other) == []
    try:
        with haproxy(hosts, tmp_path_factory.mktemp("haproxy")) as proxy:
            steps: list[str] = []
            result = drill(
                proxy,
                12.0,
                lambda: rolling(proxy, [h], stop_start, steps, leaves=True),
                progress=steps,
            )
    finally:
        h.configure(DRAIN_DELAY)
        h.running.systemctl("restart", SERVICE)
    record("one host stop + start with drain_delay = 0", summary(result))
    assert result.failures > 0, summary(result)


# ---- a host killed outright --------------------------------------------------------------


def kill_during_load(proxy: HAProxy, victim: Host) -> tuple[DrillResult, float, float]:
    """Kill the victim's box 2 s into the load; the result, and the kill and HAProxy's DOWN
    as seconds since the drill's start."""
    assert proxy.log is not None
    log = proxy.log
    moments: dict[str, float] = {}

    def kill() -> str:
        mark = log.mark()
        box = victim.running
        moments["kill"] = time.monotonic()
        box.kill()
        moments["down"] = log.wait(victim.name, "DOWN", after=mark, timeout=STATE_TIMEOUT).at
        return f"{victim.name} DOWN {moments['down'] - moments['kill']:.3f} s after the kill"

    result = drill(proxy, 6.0, kill, at=2.0)
    return result, moments["kill"] - result.t0, moments["down"] - result.t0


def test_a_killed_host_fails_only_its_requests_and_none_with_retries(
    hosts: list[Host], tmp_path_factory: pytest.TempPathFactory
) -> None:
    victim = hosts[2]
    with haproxy(hosts, tmp_path_factory.mktemp("haproxy")) as proxy:
        result, killed, down = kill_during_load(proxy, victim)
    victim.boot()
    failed = np.array([classify(int(c)) != "success" for c in result.code], dtype=bool)
    starts, ends = result.start, result.start + result.latency
    # in flight at the kill (on any host: an upper bound of those on the victim)
    in_flight = int(np.count_nonzero((starts <= killed) & (ends >= killed)))
    # sent between the kill and HAProxy's DOWN: a third of them went to the victim
    window = int(np.count_nonzero((starts > killed) & (starts <= down)))
    bound = in_flight + math.ceil(window / 2) + 1
    n_failed = int(np.count_nonzero(failed))
    no_retry = (
        f"{summary(result)}; DOWN {down - killed:.3f} s after the kill; "
        f"{in_flight} in flight at the kill, {window} sent before DOWN (bound {bound})"
    )
    record("killed host, retries 0", no_retry)
    assert n_failed > 0, no_retry
    assert n_failed <= bound, no_retry
    # every failure was in flight at the kill or sent before HAProxy reported the host DOWN
    # (the report reaches the test a moment after HAProxy acted on it)
    late = starts[failed & (starts > down + 0.05)]
    assert late.size == 0, f"{late.size} failed requests started after DOWN; {no_retry}"
    early = ends[failed] < killed
    assert not early.any(), f"{np.count_nonzero(early)} failed requests ended before the kill"

    with haproxy(hosts, tmp_path_factory.mktemp("haproxy"), retry=True) as proxy:
        result, killed, down = kill_during_load(proxy, victim)
        record(
            "killed host, retry-on conn-failure empty-response",
            f"{summary(result)}; DOWN {down - killed:.3f} s after the kill",
        )
        assert_no_failures(result, proxy)


# ---- two boxes in one network namespace -----------------------------------------------------


def test_two_boxes_sharing_a_network_namespace_each_reload_their_own_service(
    testbed: None,
) -> None:
    """Abstract unix sockets belong to the network namespace, PIDs to the PID namespace: two
    boxes in one network namespace may run sdserve as the same PID (they boot alike). The
    control socket's name carries the PID namespace, so each ``systemctl reload`` (which asks
    ``sdserve reload $MAINPID``) reaches its own service."""
    with hosts_in_namespaces(FLAVOUR, 1, DRAIN_DELAY, CHECKS.down_window) as [a]:
        b = dataclasses.replace(a, name="b", address="127.0.0.1", box=None, network=False)
        try:
            b.boot()
            pids = [main_pid(h.running) for h in (a, b)]
            sockets = subprocess.run(
                ["nsenter", f"--net={a.netns_path}", "ss", "-xlH"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            names = sorted(set(re.findall(r"@sdserve/\S+/control", sockets)))
            assert len(names) == 2, sockets
            for h in (a, b):
                h.running.systemctl("reload", SERVICE)
            record("two boxes in one network namespace", f"main PIDs {pids}, {names}")
        finally:
            if b.box is not None:
                b.box.stop()
