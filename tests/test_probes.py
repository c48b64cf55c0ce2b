"""The admin socket answers from the first moment: during start-up, while a check fails.

A Kubernetes liveness probe must not kill a process that is starting, and
``/startupz`` must be able to report a slow start: so the admin socket answers before
aiohttp or the application is imported (:mod:`sdserve.probes`), while the main socket's
connections wait in the kernel queue until the application is ready.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from sdserve.exitcodes import ExitCode
from sdserve.launcher import Instance, Launcher
from tests.conftest import ROOT, LauncherFactory
from tests.helpers import HOST, read_response, request_bytes

pytestmark = pytest.mark.asyncio

#: a PostgreSQL that refuses: nothing listens on port 1
FAILING_DB = """
[checks.db]
type = "postgres"
dsn = "postgresql://127.0.0.1:1/test"
timeout = 1
"""

#: the issue's bound for the first answers, from the process's start
FIRST_ANSWER = 0.1
#: what the answer may take beyond starting Python and importing what comes before it,
#: when a loaded machine makes even that take longer than the bound
PAST_IMPORTS = 0.05


async def light_start() -> float:
    """Seconds to start Python, import what sdserve imports before the probes answer, and
    exit: measured right now, so that a loaded machine's slowness is known."""
    began = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sdserve.cli", cwd=ROOT
    )
    await proc.wait()
    return time.monotonic() - began


def _admin_socket(tmp_path: Path) -> tuple[socket.socket, Path]:
    path = tmp_path / "admin.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(64)
    return sock, path


async def probe(path: Path, target: str, timeout: float = 10.0) -> tuple[int, str, float]:
    """(status, body, monotonic time of the answer) of one probe on the admin socket."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(request_bytes(target, close=True))
        response = await asyncio.wait_for(read_response(reader), timeout)
        return response.status, response.body.decode(), time.monotonic()
    finally:
        writer.close()


def _write_config(tmp_path: Path, checks: str = FAILING_DB, extra: str = "") -> Path:
    cfg = tmp_path / "sdserve.toml"
    cfg.write_text(f"start_timeout = 60\nretry_initial = 0.05\nretry_max = 0.2\n{extra}\n{checks}")
    return cfg


async def _waiting_for_db(launcher: Launcher, instance: Instance) -> None:
    await launcher.wait_for(
        instance, lambda m: "waiting for db" in m.fields.get("STATUS", ""), timeout=30
    )


@pytest.mark.parametrize("workers", ["0", "2"], ids=["in-process", "supervised"])
async def test_the_admin_socket_answers_during_start_up_while_a_check_fails(
    make_launcher: LauncherFactory,
    listen_sock: socket.socket,
    tmp_path: Path,
    workers: str,
) -> None:
    admin, admin_path = _admin_socket(tmp_path)
    try:
        launcher = make_launcher(
            "--config",
            str(_write_config(tmp_path)),
            "--workers",
            workers,
            sockets=[("http", listen_sock), ("admin", admin)],
        )
        baseline = await light_start()
        instance = await launcher.spawn()
        # sent at once: each waits in the admin socket's queue until something answers
        first = await asyncio.gather(
            probe(admin_path, "/startupz"),
            probe(admin_path, "/livez"),
            probe(admin_path, "/readyz?verbose"),
        )
        (startupz, _, t1), (livez, _, t2), (readyz, body, t3) = first
        took = max(t1, t2, t3) - instance.started
        bound = max(FIRST_ANSWER, baseline + PAST_IMPORTS)
        print(
            f"\nfirst answers {took * 1000:.0f} ms after the process started ({workers} "
            f"workers; bound {bound * 1000:.0f} ms; Python and the light imports alone "
            f"{baseline * 1000:.0f} ms)"
        )
        assert (startupz, livez, readyz) == (503, 200, 503)
        assert "[-]phase failed: starting" in body
        assert took < bound, (took, baseline)
        # the main socket answers nothing: its connection waits for the application
        reader, writer = await asyncio.open_connection(HOST, listen_sock.getsockname()[1])
        writer.write(request_bytes("/", close=True))
        main = asyncio.ensure_future(read_response(reader))

        await _waiting_for_db(launcher, instance)
        code, body, _ = await probe(admin_path, "/readyz?verbose")
        assert code == 503
        assert "db" in body, body
        assert "ConnectionRefusedError" in body, body
        code, body, _ = await probe(admin_path, "/startupz?format=json")
        assert code == 503
        report = json.loads(body)
        assert report["status"] == "fail"
        assert "started:state" in report["checks"]
        code, body, _ = await probe(admin_path, "/livez")
        assert (code, body) == (200, "ok\n")
        code, _, _ = await probe(admin_path, "/nowhere")
        assert code == 404
        assert not main.done()

        launcher.send_signal(signal.SIGTERM)  # a stop during start-up
        assert await asyncio.wait_for(instance.exited, 30) == ExitCode.OK
        main.cancel()
        writer.close()
    finally:
        admin.close()


async def test_the_probes_answer_the_whole_start_and_the_application_once_ready(
    make_launcher: LauncherFactory,
    listen_sock: socket.socket,
    tmp_path: Path,
) -> None:
    """With workers: the supervisor answers until a worker is ready, then the workers do,
    with every check's result."""
    admin, admin_path = _admin_socket(tmp_path)
    flag = tmp_path / "ready"
    try:
        launcher = make_launcher(
            "--workers",
            "2",
            "--config",
            str(_write_config(tmp_path, checks="", extra="[health]\ninterval = 0.2")),
            env={"TESTAPP_READY_FILE": str(flag)},
            sockets=[("http", listen_sock), ("admin", admin)],
        )
        instance = await launcher.spawn()
        await launcher.wait_for(
            instance, lambda m: "waiting for flag-file" in m.fields.get("STATUS", ""), timeout=30
        )
        code, body, _ = await probe(admin_path, "/readyz?verbose")
        assert code == 503, body
        assert "flag-file" in body, body
        flag.touch()
        await launcher.wait_for(instance, lambda m: m.has("READY", "1"), timeout=30)
        code, body, _ = await probe(admin_path, "/readyz?verbose")
        assert code == 200, body
        assert "[+]flag-file ok" in body, body
        assert "[+]phase ok" in body, body
        assert await launcher.stop() == ExitCode.OK
    finally:
        admin.close()


async def test_a_reload_whose_checks_fail_never_answers_not_ready(
    make_launcher: LauncherFactory,
    listen_sock: socket.socket,
    tmp_path: Path,
) -> None:
    """The warming generation never answers the admin socket: /readyz stays 200 from the
    generation that serves, then the failed reload leaves it serving."""
    admin, admin_path = _admin_socket(tmp_path)
    try:
        cfg = _write_config(tmp_path, checks="", extra="reload_timeout = 3")
        launcher = make_launcher(
            "--workers",
            "2",
            "--config",
            str(cfg),
            sockets=[("http", listen_sock), ("admin", admin)],
        )
        instance = await launcher.start()
        cfg.write_text(cfg.read_text() + FAILING_DB)  # the next generation waits for db
        reload = asyncio.ensure_future(launcher.reload_command(timeout=60))
        await launcher.wait_for(
            instance, lambda m: "reloading" in m.fields.get("STATUS", ""), timeout=30
        )
        answers = []
        for _ in range(20):  # while the new generation waits for db (up to reload_timeout)
            code, _, _ = await probe(admin_path, "/readyz")
            answers.append(code)
            if reload.done():
                break
        code, text = await reload
        assert code != 0, text
        assert answers, "no probe during the reload"
        assert set(answers) == {200}, answers
        status, _, _ = await probe(admin_path, "/readyz")
        assert status == 200
        assert await launcher.stop() == ExitCode.OK
    finally:
        admin.close()


async def test_a_failed_start_is_reported_once_whatever_the_number_of_workers(
    make_launcher: LauncherFactory, tmp_path: Path
) -> None:
    """Before: the reason was logged by each worker's report, again as the worker's exit
    ("exited before it was ready") and again as the supervisor's fatal line."""
    cfg = tmp_path / "sdserve.toml"
    cfg.write_text(f"start_timeout = 1\nretry_initial = 0.05\nretry_max = 0.2\n{FAILING_DB}")
    launcher = make_launcher("--workers", "3", "--config", str(cfg))
    instance = await launcher.spawn()
    assert await asyncio.wait_for(instance.exited, 30) == ExitCode.STARTUP
    log = instance.log_text()
    reasons = [line for line in log.splitlines() if "critical checks did not pass" in line]
    assert len(reasons) == 1, log
    assert "ERROR" in reasons[0]
    # the other workers either failed the same way ("failed to start too (the same
    # reason)") or were stopped first
    assert "failed to start too:" not in log
    assert "died unexpectedly" not in log
    assert "exited before it was ready" not in log
    assert "giving up: the start failed (exit status 3; reason above)" in log
