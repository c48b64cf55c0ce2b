"""Under a real systemd: the admin socket answers while the start waits for a check, and
``sdserve status`` shows it from an operator's shell (the hardened unit's user namespace
and all)."""

from __future__ import annotations

import pytest

from sdserve.units import UnitSpec

from .test_systemd import FLAG_DIR, SERVICE, curl, install
from .testbed import Box, message


@pytest.mark.parametrize(
    "workers", [pytest.param(0, id="in-process"), pytest.param(None, id="supervised")]
)
def test_admin_socket_and_status_while_a_check_fails_then_passes(
    box: Box, flavour: str, workers: int | None
) -> None:
    flag = f"{FLAG_DIR}/ready"
    install(
        box,
        flavour,
        spec=UnitSpec(workers=workers, admin_listen=("127.0.0.1:8081",)),
        environment={"DEMO_WAIT_FILE": flag},
    )
    box.systemctl("start", "sdserve.socket", "sdserve-admin.socket")
    cursor = box.cursor()
    box.systemctl("start", "--no-block", SERVICE)
    box.wait_journal(
        lambda e: e.get("SDSERVE_CHECK") == "flag-file" and "(attempt 2)" in message(e),
        cursor=cursor,
        unit=SERVICE,
        timeout=30,
        what="a second failed attempt of the flag-file check",
    )
    assert box.show(SERVICE, "ActiveState")["ActiveState"] == "activating"
    live = curl(box, "http://127.0.0.1:8081/livez", "-w", " %{http_code}")
    assert live.stdout.endswith(" 200"), live
    start = curl(box, "http://127.0.0.1:8081/startupz", "-w", " %{http_code}")
    assert start.stdout.endswith(" 503"), start
    ready = curl(box, "http://127.0.0.1:8081/readyz?verbose", "-w", " %{http_code}")
    assert ready.stdout.endswith(" 503"), ready
    assert "flag-file" in ready.stdout, ready

    res = box.run(["sdserve", "status"], check=False)
    print(f"\n{res.stdout}")
    assert res.returncode == 1, (res.stdout, res.stderr)  # running, not ready
    assert "phase starting" in res.stdout
    assert "readiness: NOT READY (/readyz 503)" in res.stdout
    assert "flag-file" in res.stdout

    box.run(["touch", flag])
    box.systemctl("start", SERVICE)  # joins the start job: returns once READY=1 came
    res = box.run(["sdserve", "status"], check=False)
    print(f"\n{res.stdout}")
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert "readiness: READY (/readyz 200)" in res.stdout
    if workers is None:
        assert "supervisor  phase running  generation 1" in res.stdout
    else:
        assert "single process  phase ready" in res.stdout
