"""Issue 11 under a real systemd: journald stopped with SIGSTOP while the service logs every
request. Logging goes through a bounded queue to a thread, so the event loops never wait on
the journal: requests are still served, the watchdog (4 s here) does not fire, and once
journald runs again the service reports how many lines it dropped.

The 10 s stall is the schedule under test (the load's own bound), not synchronisation.
"""

from __future__ import annotations

import pytest

from .test_systemd import SERVICE, Record, from_unit, install, main_pid
from .testbed import Box, JournalEntry

STALL = 10.0  # seconds journald stays stopped: well past WatchdogSec=4s


def workers(box: Box) -> set[str]:
    out = box.run(["ps", "-o", "pid=", "--ppid", str(main_pid(box))], check=False).stdout
    return set(out.split())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stopped_journald_stalls_no_request_and_no_watchdog(
    box: Box, flavour: str, record: Record
) -> None:
    install(box, flavour, environment={"SDSERVE_ACCESS_LOG": "true"}, service=["WatchdogSec=4s"])
    box.systemctl("start", "sdserve.socket", SERVICE)
    pid, serving = main_pid(box), workers(box)
    assert len(serving) >= 1
    journald = main_pid(box, "systemd-journald.service")
    cursor = box.cursor()
    box.run(["kill", "-STOP", str(journald)])
    try:
        with box.load(keepalive=4, fresh=4, max_seconds=STALL, max_requests=2_000_000) as load:
            load.proc.wait(timeout=STALL + 30)  # the load ends by itself at its bound
            result = load.finish()
    finally:
        box.run(["kill", "-CONT", str(journald)])

    def dropped(entry: JournalEntry) -> bool:
        return from_unit(entry) and entry.get("SDSERVE_PHASE") == "log-dropped"

    note = box.wait_journal(dropped, cursor=cursor, unit=SERVICE, what="the dropped-lines report")
    record("journald stopped 10 s under load", f"{result.summary()}; {note['MESSAGE']}")
    assert result.failed == 0, result.summary() + "\n" + "\n".join(result.examples)
    assert result.ok > 1000, result.summary()
    assert result.longest_s < 2.0, "a request waited on the journal: " + result.summary()
    assert int(note["SDSERVE_DROPPED"]) > 0
    # no watchdog kill of the service, nor of a worker by the supervisor
    state = box.show(SERVICE, "ActiveState", "NRestarts", "MainPID")
    assert state == {"ActiveState": "active", "NRestarts": "0", "MainPID": str(pid)}
    assert workers(box) == serving
    texts = [str(e.get("MESSAGE", "")) for e in box.journal(cursor=cursor)]
    assert not [t for t in texts if "atchdog" in t], [t for t in texts if "atchdog" in t]
