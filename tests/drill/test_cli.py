"""The command line: exit status, JSON that follows the schema, the HTML file."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from sdserve.drill.schema import SCHEMA_ID, DrillJson
from tests.drill.schemacheck import check
from tests.drill.servers import FaultyServer

StartServer = Callable[..., FaultyServer]


def drill(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sdserve.drill", *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def test_clean_run_passes_and_writes_valid_json(faulty: StartServer, tmp_path: Path) -> None:
    server = faulty("none")
    out = tmp_path / "out.json"
    report = tmp_path / "report.html"
    proc = drill(
        f"3={server.url}",
        f"1={server.url}slow",
        "-d", "1", "-c", "4", "-p", "2", "--keepalive", "0.5",
        "--action", "signal signal=WINCH times=2 every=0.3 at=0.2",
        "--pid", str(server.proc.pid),
        "--json", str(out), "--html", str(report),
    )  # fmt: skip
    records = server.stop()
    assert proc.returncode == 0, proc.stderr
    assert "result: PASS" in proc.stdout
    doc = json.loads(out.read_text())
    assert check(doc, DrillJson) == []
    assert doc["schema"] == SCHEMA_ID
    assert doc["passed"] is True
    overall = doc["phases"]["overall"]
    assert overall["requests"] == records["requests"] == overall["classes"]["success"]
    assert [t["requests"] for t in doc["targets"]] != [0, 0]
    assert sum(t["requests"] for t in doc["targets"]) == overall["requests"]
    assert sum(s["requests"] for s in doc["timeline"]) == overall["requests"]
    phases = doc["phases"]
    assert sum(phases[p]["requests"] for p in ("steady", "during", "after")) == overall["requests"]
    assert [a["name"] for a in doc["actions"]] == ["signal SIGWINCH"] * 2
    assert all(a["ok"] for a in doc["actions"])
    assert doc["resources"]
    assert all(r["pid"] == server.proc.pid for r in doc["resources"])
    assert report.read_text().startswith("<!DOCTYPE html>")


def test_failures_above_the_limit_exit_1(faulty: StartServer, tmp_path: Path) -> None:
    server = faulty("status", "--every", "2", "--code", "503")
    out = tmp_path / "out.json"
    proc = drill(server.url, "-d", "0.5", "-c", "2", "-p", "1", "--json", str(out))
    records = server.stop()
    assert proc.returncode == 1, proc.stderr
    assert "result: FAIL" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["passed"] is False
    assert doc["phases"]["overall"]["status_5xx"] == {"503": records["counts"]["503"]}


def test_failures_within_the_limit_exit_0(faulty: StartServer) -> None:
    server = faulty("status", "--every", "2", "--code", "503")
    proc = drill(server.url, "-d", "0.5", "-c", "2", "-p", "1", "--max-failures", "1000000")
    server.stop()
    assert proc.returncode == 0, proc.stderr


def test_failed_action_exits_3(faulty: StartServer) -> None:
    server = faulty("none")
    proc = drill(server.url, "-d", "0.5", "-c", "1", "-p", "1", "-a", "command cmd=false at=0.1")
    server.stop()
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "FAILED command #1" in proc.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["http://10.1.2.3:80/"],
        ["http://example.com/"],
        ["http://[2001:db8::1]:80/"],
        ["https://127.0.0.1/"],
        ["http://127.0.0.1:9/", "--action", "restart"],  # restart needs --unit
        ["http://127.0.0.1:9/", "--action", "teleport"],
        ["http://127.0.0.1:9/", "--keepalive", "2"],
    ],
)
def test_bad_arguments_exit_2(args: list[str]) -> None:
    proc = drill(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "sdserve drill:" in proc.stderr
