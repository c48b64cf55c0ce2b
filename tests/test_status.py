"""``sdserve status``: a running service's workers, generation, readiness and checks."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from pathlib import Path

import pytest

from sdserve.exitcodes import ExitCode
from tests.conftest import ROOT, LauncherFactory
from tests.test_probes import _admin_socket, _waiting_for_db, _write_config

pytestmark = pytest.mark.asyncio


async def status(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sdserve",
        "status",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_status_during_a_failing_check_names_it_and_every_worker(
    make_launcher: LauncherFactory, listen_sock: socket.socket, tmp_path: Path
) -> None:
    admin, _ = _admin_socket(tmp_path)
    try:
        launcher = make_launcher(
            "--workers",
            "2",
            "--config",
            str(_write_config(tmp_path)),
            sockets=[("http", listen_sock), ("admin", admin)],
        )
        instance = await launcher.spawn()
        await _waiting_for_db(launcher, instance)
        code, out, err = await status(str(instance.pid))
        print("\n" + out)
        assert code == 1, err  # running, not ready
        assert f"pid {instance.pid}  supervisor  phase starting  generation 1" in out
        assert "readiness: NOT READY (/readyz 503)" in out
        assert "workers: 0/2 ready" in out
        assert "FAIL  db" in out
        assert "ConnectionRefusedError" in out
        assert f"admin=unix:{tmp_path / 'admin.sock'}" in out

        code, out, _ = await status(str(instance.pid), "--json")
        assert code == 1
        report = json.loads(out)
        assert report["service"]["phase"] == "starting"
        assert [w["state"] for w in report["service"]["workers"]] == ["starting", "starting"]
        readyz_code, readyz = report["health"]["readyz"]
        assert readyz_code == 503
        assert readyz["checks"]["db:responseTime"][0]["status"] == "fail"

        launcher.send_signal(signal.SIGTERM)  # a stop during start-up
        assert await asyncio.wait_for(instance.exited, 30) == ExitCode.OK
    finally:
        admin.close()


async def test_status_of_a_ready_service_after_a_reload(
    make_launcher: LauncherFactory, listen_sock: socket.socket, tmp_path: Path
) -> None:
    admin, _ = _admin_socket(tmp_path)
    try:
        launcher = make_launcher(
            "--workers", "2", sockets=[("http", listen_sock), ("admin", admin)]
        )
        instance = await launcher.start()
        await launcher.reload()
        code, out, err = await status(str(instance.pid))
        print("\n" + out)
        assert code == 0, err
        assert "phase running  generation 2" in out
        assert "readiness: READY (/readyz 200)" in out
        assert "workers: 2/2 ready" in out
        assert out.count(" ready  ") >= 0  # the table is printed
        rows = [
            line.split() for line in out.splitlines() if line.startswith("  ") and "ready" in line
        ]
        assert len([r for r in rows if r[2:4] == ["2", "ready"]]) == 2, out
        assert await launcher.stop() == ExitCode.OK
    finally:
        admin.close()


async def test_status_single_process_and_without_an_admin_socket(
    make_launcher: LauncherFactory,
) -> None:
    launcher = make_launcher()
    instance = await launcher.start()
    code, out, err = await status(str(instance.pid))
    assert code == 0, err
    assert "single process  phase ready" in out
    assert "no admin socket: checks not shown" in out
    assert await launcher.stop() == ExitCode.OK


async def test_status_of_nothing_says_so() -> None:
    code, out, err = await status("999999999")
    assert code == 2
    assert out == ""
    assert "cannot reach the control socket of pid 999999999" in err
