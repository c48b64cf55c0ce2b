"""Reloads under a real systemd: a bad release keeps the old code serving, and workers warm up
at a lower CPU priority inside the hardened unit. (Twenty reloads under load are in
test_systemd.py.)

The application lives in a writable directory of the box, so a test can release new code by
writing the file and reloading.
"""

from __future__ import annotations

import pytest

from sdserve.units import UnitSpec
from tests.apps.release import BAD_RELEASES, source

from .test_systemd import SERVICE, curl, install, main_pid, sdserve_entries, wait_reload_end
from .testbed import Box

APP_DIR = "/opt/relapp"


def release(box: Box, version: str, extra: str = "") -> None:
    box.run(["mkdir", "-p", APP_DIR])
    box.write(f"{APP_DIR}/relapp.py", source(version, extra))


def install_app(box: Box, flavour: str) -> None:
    release(box, "v1")
    install(
        box,
        flavour,
        spec=UnitSpec(app="relapp:create_app", workers=2, start_timeout=3),
        environment={"PYTHONPATH": APP_DIR, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    box.systemctl("start", "sdserve.socket", SERVICE)


def reload_and_wait(box: Box, cursor: str) -> tuple[str, int]:
    """``systemctl reload`` (which waits for the outcome): the phase that ended it in the
    journal, and the exit status of ``systemctl reload``."""
    res = box.systemctl("reload", SERVICE, check=False)
    return str(wait_reload_end(box, cursor)["SDSERVE_PHASE"]), res.returncode


def served_versions(box: Box, n: int = 10) -> set[str]:
    versions = set()
    for _ in range(n):
        res = curl(box, "http://127.0.0.1:8080/")
        assert res.returncode == 0, res.stderr
        versions.add(res.stdout.split()[0])
    return versions


@pytest.mark.parametrize("bad", ["failing-check", "syntax-error"])
def test_bad_release_keeps_the_old_code_serving(box: Box, flavour: str, bad: str) -> None:
    install_app(box, flavour)
    pid = main_pid(box)
    with box.load(keepalive=4, fresh=4, max_seconds=120, max_requests=200_000) as load:
        release(box, "v2-bad", BAD_RELEASES[bad])
        outcome, code = reload_and_wait(box, box.cursor())
        assert outcome == "reload-failed"
        assert code != 0, "systemctl reload must fail when the reload failed"
        assert served_versions(box) == {"v1"}
        status = box.systemctl("status", "--no-pager", SERVICE, check=False).stdout
        props = box.show(SERVICE, "ActiveState", "StatusText")
        assert props["ActiveState"] == "active"
        assert "reload FAILED" in props["StatusText"]
        assert "still serving the old code" in status
        # the fixed release goes live with the next reload
        release(box, "v3")
        assert reload_and_wait(box, box.cursor()) == ("reloaded", 0)
        assert served_versions(box) == {"v3"}
        result = load.finish()
    assert main_pid(box) == pid
    assert result.failed == 0, result.summary() + "\n" + "\n".join(result.examples)
    assert result.ok == result.requests > 0


def test_workers_serve_at_the_supervisors_priority(box: Box, flavour: str) -> None:
    """Workers warm up nicer only where they may return (LimitNICE=+0 on a real host). In
    this box the hard RLIMIT_NICE is 0 and cannot be raised (the test machine's container
    lacks CAP_SYS_RESOURCE), so they must not lower it at all: never stuck behind the host."""
    cursor = box.cursor()
    install_app(box, flavour)
    pid = main_pid(box)
    assert "Max nice priority         0" in box.run(["cat", f"/proc/{pid}/limits"]).stdout
    children = box.run(["cat", f"/proc/{pid}/task/{pid}/children"]).stdout.split()
    names = []
    for child in children:  # the workers, and the warm template they are forked from
        stat = box.run(["cat", f"/proc/{child}/stat"]).stdout
        names.append(stat.split("(", 1)[1].rsplit(")", 1)[0])
        assert stat.rsplit(")", 1)[1].split()[16] == "0"  # nice
    assert len([name for name in names if name != "sdserve-warm"]) == 2, names
    entries = sdserve_entries(box, cursor)
    assert not [e for e in entries if e["SDSERVE_PHASE"] == "priority"]
