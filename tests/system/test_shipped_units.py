"""The repository's ``units/`` folder as an operator uses it without a package: copied
wholesale into ``/etc/systemd/system`` (README and all), on systemd 252 (Debian 12's own) and
254.

- Nothing in the folder changes the units by systemd version: no drop-in folder, so no
  ``Type=notify-reload`` drop-in that would empty ``ExecReload=`` on 252 (where
  ``systemctl reload`` then failed with "Job type reload is not applicable").
- ``systemctl reload`` works for ``sdserve.service`` and an ``sdserve@`` instance.
- The exposure scores that ``units/README.md`` states are the ones
  ``systemd-analyze security`` computes, for the loaded units and with ``--offline=yes`` on
  the files, exactly; the top-level README's number is the loaded units' one.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from .testbed import Box

pytestmark = pytest.mark.system

CHECKOUT = Path(__file__).resolve().parents[2]
UNITS = CHECKOUT / "units"
UNIT_DIR = "/etc/systemd/system"
DEMO = 'app = "sdserve.demo:create_app"\nlog = "auto"\n'
Record = Callable[[str, str], None]
# | 252 | sdserve.service | 1.2 | 1.4 |  (systemd, unit, loaded, --offline=yes)
_ROW = re.compile(r"^\|\s*(\d+)\b[^|]*\|\s*`?([\w@.-]+)`?\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|")
_SCORE = re.compile(r"Overall exposure level for \S+: (\d+\.\d+)")


def documented_exposure() -> dict[tuple[str, str], tuple[str, str]]:
    """(systemd, unit) -> (loaded, offline), from the table in units/README.md."""
    rows = {}
    for line in (UNITS / "README.md").read_text().splitlines():
        m = _ROW.match(line)
        if m:
            rows[m.group(1), m.group(2)] = (m.group(3), m.group(4))
    return rows


def exposure(box: Box, *args: str) -> str:
    res = box.run(["systemd-analyze", "security", "--no-pager", *args], check=False)
    m = _SCORE.search(res.stdout)
    assert m, res.stdout + res.stderr
    return m.group(1)


def copy_units_wholesale(box: Box) -> list[str]:
    """``cp -r units/. /etc/systemd/system/``: every file of the folder, as it is."""
    archive = subprocess.run(
        ["tar", "-C", str(UNITS), "-cf", "-", "."], capture_output=True, check=True, timeout=30
    ).stdout
    subprocess.run(
        box.command(["tar", "-C", UNIT_DIR, "--no-same-owner", "-xf", "-"]),
        input=archive,
        check=True,
        timeout=60,
    )
    box.systemctl("daemon-reload")
    return sorted(str(p.relative_to(UNITS)) for p in UNITS.rglob("*") if p.is_file())


def reload_keeps_serving(box: Box, service: str, curl: list[str]) -> None:
    res = box.run(curl, check=False, timeout=40)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("hello from sdserve demo"), res.stdout
    box.systemctl("start", service)  # joins the start job the socket queued
    pid = box.show(service, "MainPID")["MainPID"]
    res = box.systemctl("reload", service, check=False)
    assert res.returncode == 0, res.stderr
    assert box.show(service, "MainPID", "ActiveState") == {"MainPID": pid, "ActiveState": "active"}
    assert box.run(curl, timeout=40).stdout.startswith("hello from sdserve demo")


def test_units_copied_wholesale_reload_and_score_as_documented(
    box: Box, flavour: str, record: Record
) -> None:
    files = copy_units_wholesale(box)
    # nothing but the units and their README: no drop-in folder for any systemd version
    assert not [f for f in files if "/" in f], files
    units = ["sdserve.socket", "sdserve-admin.socket", "sdserve.service"]
    units += ["sdserve@demo.socket", "sdserve@demo.service"]
    for unit in units:
        assert box.show(unit, "DropInPaths")["DropInPaths"] == "", unit
    for service in ("sdserve.service", "sdserve@demo.service"):
        props = box.show(service, "Type", "ExecReload")
        assert props["Type"] == "notify"
        assert "sdserve reload" in props["ExecReload"], props

    box.write("/etc/sdserve/sdserve.toml", DEMO)
    box.write("/etc/sdserve/demo.toml", DEMO)
    box.systemctl("start", "sdserve.socket", "sdserve@demo.socket")
    reload_keeps_serving(
        box, "sdserve.service", ["curl", "-sS", "--max-time", "30", "http://127.0.0.1:8080/"]
    )
    reload_keeps_serving(
        box,
        "sdserve@demo.service",
        ["curl", "-sS", "--max-time", "30", "--unix-socket", "/run/sdserve/demo.sock", "http://x/"],
    )

    documented = documented_exposure()
    for unit, path in (
        ("sdserve.service", f"{UNIT_DIR}/sdserve.service"),
        ("sdserve@.service", f"{UNIT_DIR}/sdserve@.service"),
    ):
        loaded = exposure(box, "sdserve@demo.service" if unit.startswith("sdserve@") else unit)
        offline = exposure(box, "--offline=yes", path)
        record(f"exposure of units/{unit} (loaded, --offline=yes)", f"{loaded}, {offline}")
        assert documented.get((flavour, unit)) == (loaded, offline), (
            f"units/README.md states {documented.get((flavour, unit))} for {unit} on systemd "
            f"{flavour}; systemd-analyze security says loaded {loaded}, offline {offline}"
        )
    # the top-level README gives one number: the loaded sdserve.service's (the same on both)
    readme = re.findall(
        r"`systemd-analyze security`: (\d+\.\d+)", (CHECKOUT / "README.md").read_text()
    )
    assert readme == [documented[flavour, "sdserve.service"][0]], readme
