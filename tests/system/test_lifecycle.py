"""Issue 10 under a real systemd (252 and 254): operations that overlap, under load, lose no
request and never close the port.

- ``systemctl reload``, then ``systemctl restart`` 0.3 s later (the restart queues behind the
  reload job, or finds the reload running: either way nothing may fail);
- ``systemctl stop`` during a reload (the stop cancels the reload job; what drains drains,
  what starts stops; the next connection activates the service again);
- 20 ``systemctl restart`` 2 s apart, and 20 back to back, with no ``reset-failed`` in
  between: the socket never fails, the port never closes. (With systemd's default start
  limit, 5 starts in 10 s, the back-to-back run fails the 5th restart with
  ``start-limit-hit``, which fails the socket and closes the port: over 3,000 connections
  were refused on 252 and on 254 when this was measured.)

The 0.3 s and 2 s are the schedules under test, written into a shell script that runs inside
the box, not synchronisation. The load runs inside the box against its own 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pytest

from .test_systemd import SERVICE, Record, install, main_pid
from .testbed import Box, Load, LoadResult

SOCKET = "sdserve.socket"


@contextlib.contextmanager
def load(box: Box, max_seconds: float) -> Iterator[Load]:
    """Busy keep-alive, new-connection and paced keep-alive clients (idle 0.3 s between
    requests, inside the idle grace), on a 20 ms handler."""
    with box.load(
        path="/slow?ms=20",
        keepalive=8,
        fresh=8,
        paced=4,
        pause=0.3,
        max_seconds=max_seconds,
        max_requests=2_000_000,
    ) as running:
        yield running


def around_failures(box: Box, result: LoadResult, span: float = 1.0) -> str:
    """The service's journal within ``span`` s of each failure the load saw (both clocks are
    the host's CLOCK_MONOTONIC: a box has no time namespace), for the assertion message."""
    times = [float(e.split()[0]) for e in result.examples]
    if not times:
        return ""
    lines = []
    for entry in box.journal(unit=SERVICE):
        at = int(entry.get("__MONOTONIC_TIMESTAMP", "0")) / 1e6
        if any(abs(at - t) <= span for t in times):
            pid = entry.get("_PID", "?")
            phase = entry.get("SDSERVE_PHASE", "")
            lines.append(f"{at:.3f} [{pid}] {phase} {entry.get('MESSAGE', '')}")
    return "\njournal around the failures:\n" + "\n".join(lines)


def handed_over_closed_none(box: Box) -> int:
    """Every supervisor of the service closed none of the connections handed to it (a
    client may have been about to send on any of them, and the load's clients do not
    always send in time to see it); how many came back from a stopping worker and were
    passed on."""
    given_back = 0
    for entry in box.journal(unit=SERVICE):
        if entry.get("SDSERVE_PHASE") == "handover" and "SDSERVE_CLOSED" in entry:
            assert entry["SDSERVE_CLOSED"] == "0", entry.get("MESSAGE")
            given_back += int(entry.get("SDSERVE_GIVEN_BACK", "0"))
        assert "handed over were lost" not in entry.get("MESSAGE", ""), entry
    return given_back


def no_failures(result: LoadResult, box: Box) -> None:
    context = around_failures(box, result) if result.failed else ""
    assert result.failed == 0, result.summary() + "\n" + "\n".join(result.examples) + context
    assert result.ok == result.requests > 0
    assert result.hung_clients == 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_restart_0_3_s_after_a_reload_loses_nothing(box: Box, flavour: str, record: Record) -> None:
    install(box, flavour)
    box.systemctl("start", SOCKET, SERVICE)
    pids = [main_pid(box)]
    with load(box, max_seconds=300) as running:
        for _ in range(10):
            # the schedule under test, inside the box
            script = f"systemctl reload --no-block {SERVICE} && sleep 0.3"
            res = box.sh(f"{script} && systemctl restart {SERVICE}", timeout=120)
            assert res.returncode == 0, res.stderr
            pids.append(main_pid(box))
            assert box.show(SERVICE, "ActiveState")["ActiveState"] == "active"
        result = running.finish()
    record("reload, then restart 0.3 s later (x10)", result.summary())
    assert len(set(pids)) == 11, pids
    assert box.show(SOCKET, "ActiveState")["ActiveState"] == "active"
    no_failures(result, box)  # first: its message has the journal around the failures
    given_back = handed_over_closed_none(box)
    record("reload, then restart 0.3 s later: connections given back", str(given_back))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stop_during_a_reload_loses_nothing(box: Box, flavour: str, record: Record) -> None:
    # a warm-up long enough that the stop lands in the middle of the reload
    install(box, flavour, environment={"DEMO_WARMUP": "1.5"})
    box.systemctl("start", SOCKET, SERVICE)
    with load(box, max_seconds=300) as running:
        for _ in range(5):
            cursor = box.cursor()
            box.systemctl("reload", "--no-block", SERVICE)
            box.wait_journal(
                lambda e: e.get("SDSERVE_PHASE") == "worker-start",
                cursor=cursor,
                unit=SERVICE,
                timeout=30,
                what="the reload's first new worker",
            )
            box.systemctl("stop", SERVICE)
            end = box.wait_journal(
                lambda e: e.get("SDSERVE_PHASE") == "exit" and "SDSERVE_EXIT" in e,
                cursor=cursor,
                unit=SERVICE,
                timeout=30,
                what="the supervisor's exit",
            )
            assert end["SDSERVE_EXIT"] == "0", end
            # the queued connections start it again (socket activation), or this does
            box.systemctl("start", SERVICE)
        result = running.finish()
    record("stop during a reload (x5)", result.summary())
    assert box.show(SOCKET, "ActiveState")["ActiveState"] == "active"
    no_failures(result, box)
    given_back = handed_over_closed_none(box)
    record("stop during a reload: connections given back", str(given_back))


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("pause", [2, 0], ids=["2s-apart", "back-to-back"])
def test_twenty_restarts_never_close_the_port(
    box: Box, flavour: str, record: Record, pause: int
) -> None:
    install(box, flavour)
    box.systemctl("start", SOCKET, SERVICE)
    pids = [main_pid(box)]
    began = time.monotonic()
    with load(box, max_seconds=600) as running:
        script = (
            f"for i in $(seq 20); do systemctl restart {SERVICE} || exit 1; sleep {pause}; done"
        )
        res = box.sh(script, timeout=600)
        assert res.returncode == 0, res.stderr
        pids.append(main_pid(box))
        result = running.finish()
    took = time.monotonic() - began
    record(
        f"20 restarts {pause} s apart, no reset-failed",
        f"{result.summary()}; {took:.0f} s in all",
    )
    sock = box.show(SOCKET, "ActiveState", "Result")
    assert sock == {"ActiveState": "active", "Result": "success"}, sock
    assert box.show(SERVICE, "ActiveState")["ActiveState"] == "active"
    assert len(set(pids)) == 2
    no_failures(result, box)
    assert result.requests > 20 * 20
