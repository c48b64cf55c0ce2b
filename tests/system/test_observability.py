"""Under a real systemd: access-log entries with their trace ids in the journal (read with
``journalctl -o json``), every one of a busy service's, the version in the first entry and in
STATUS=, and the metrics on the admin socket of the hardened unit."""

from __future__ import annotations

import re

import pytest

from sdserve import __version__
from sdserve.units import UnitSpec

from .test_systemd import SERVICE, curl, install
from .testbed import Box, message

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.mark.parametrize(
    "workers", [pytest.param(0, id="in-process"), pytest.param(2, id="supervised")]
)
def test_trace_ids_version_and_metrics_in_the_box(box: Box, flavour: str, workers: int) -> None:
    install(
        box,
        flavour,
        spec=UnitSpec(workers=workers, admin_listen=("127.0.0.1:8081",)),
        environment={"SDSERVE_ACCESS_LOG": "true"},
    )
    box.systemctl("start", "sdserve.socket", "sdserve-admin.socket")
    cursor = box.cursor()
    box.systemctl("start", SERVICE)
    status = box.show(SERVICE, "StatusText")["StatusText"]
    assert status.endswith(f"; sdserve {__version__}"), status

    given = curl(
        box,
        "http://127.0.0.1:8080/",
        "-D",
        "-",
        "-H",
        f"traceparent: 00-{TRACE}-00f067aa0ba902b7-01",
    )
    assert f"traceparent: 00-{TRACE}-" in given.stdout.lower(), given
    made = curl(box, "http://127.0.0.1:8080/", "-D", "-")
    found = re.search(r"(?im)^x-request-id: ([0-9a-f]{32})\r?$", made.stdout)
    assert found is not None, made
    generated = found.group(1)
    probe = curl(box, "http://127.0.0.1:8081/readyz", "-w", " %{http_code}")
    assert probe.stdout.endswith(" 200"), probe

    def access(trace: str) -> dict[str, object]:
        return box.wait_journal(
            lambda e: e.get("SDSERVE_PHASE") == "access" and e.get("SDSERVE_TRACE_ID") == trace,
            cursor=cursor,
            unit=SERVICE,
            timeout=30,
            what=f"the access-log entry of trace {trace}",
        )

    first, second = access(TRACE), access(generated)
    for entry in (first, second):
        assert entry["SDSERVE_METHOD"] == "GET"
        assert entry["SDSERVE_PATH"] == "/"
        assert entry["SDSERVE_STATUS"] == "200"
        assert entry["SDSERVE_CLIENT"] == "127.0.0.1"
        assert str(entry["SDSERVE_USER_AGENT"]).startswith("curl/")
        assert float(str(entry["SDSERVE_DURATION_MS"])) >= 0
    assert second["SDSERVE_REQUEST_ID"] == generated

    metrics = curl(box, "http://127.0.0.1:8081/metrics")
    assert re.search(
        r'sdserve_requests_total\{code="2xx",method="GET",route="/"\} 2\.0', metrics.stdout
    ), metrics.stdout
    box.systemctl("stop", SERVICE)
    entries = [e for e in box.journal(cursor=cursor, unit=SERVICE) if "SDSERVE_PHASE" in e]
    assert entries[0]["SDSERVE_VERSION"] == __version__
    assert message(entries[0]).startswith(f"sdserve {__version__} (Python "), entries[0]
    # the probe is not in the access log
    assert not any(e.get("SDSERVE_PATH") == "/readyz" for e in entries)


#: more requests than the access log's queue holds (10,000), in a few seconds
BUSY = 12_000


def test_every_access_line_of_a_busy_service_is_in_the_journal(box: Box, flavour: str) -> None:
    """A burst of requests at a few thousand a second: each has its entry in the journal,
    none dropped by the access log's bounded queue (its writer keeps up with journald) nor
    by journald (below its rate limit per unit: 10,000 entries in 30 s, times a factor of
    the free disk space; the README says what to set above it)."""
    install(box, flavour, environment={"SDSERVE_ACCESS_LOG": "true"})
    box.systemctl("start", "sdserve.socket")
    cursor = box.cursor()
    box.systemctl("start", SERVICE)
    with box.load(keepalive=4, fresh=0, max_requests=BUSY, max_seconds=120) as load:
        load.proc.wait(timeout=150)  # it ends by itself after BUSY requests
        result = load.finish()
    assert result.failed == 0, result.summary()
    box.systemctl("stop", SERVICE)  # the access log's writer empties its queue at exit
    entries = box.journal(cursor=cursor)
    access = sum(1 for e in entries if e.get("SDSERVE_PHASE") == "access")
    suppressed = [message(e) for e in entries if "uppressed" in message(e)]
    assert access == result.requests, (access, result.requests, suppressed)
