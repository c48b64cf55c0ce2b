"""Issue 10: operations that overlap, crashes and timeouts, one regression test per case, with
real processes, signals and sockets.

The launcher plays systemd's part (sdserve.launcher); synchronisation is on notify messages,
the request gate, and process exits.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from sdserve.exitcodes import ExitCode
from sdserve.launcher import Instance, Launcher, NotifyMessage
from tests.apps.release import BAD_RELEASES
from tests.conftest import LauncherFactory, MakeSupervised
from tests.helpers import (
    HOST,
    Gate,
    ProtocolError,
    children,
    get,
    read_response,
    request_bytes,
    versions,
    wait_exit,
    write_app,
)

pytestmark = pytest.mark.asyncio


def status_has(text: str) -> Callable[[NotifyMessage], bool]:
    return lambda m: text in m.fields.get("STATUS", "")


async def wait_status(
    launcher: Launcher, instance: Instance, text: str, *, mark: int = 0, timeout: float = 30
) -> NotifyMessage:
    return await launcher.wait_for(instance, status_has(text), timeout=timeout, start=mark)


def supervised_controlled(make_launcher: LauncherFactory, *args: str, **kw: object) -> Launcher:
    """The controlled app (gate, hooks, blocking routes) under the supervisor."""
    return make_launcher("--workers", "2", *args, **kw)


def worker_pid(instance: Instance, worker: int) -> int:
    """The PID of worker ``worker`` as the supervisor logged it when it started it."""
    m = re.search(rf"started worker {worker} \(pid (\d+),", instance.log_text())
    assert m, instance.log_text()
    return int(m.group(1))


# -- case 1: SIGTERM during a reload ----------------------------------------------------------


@pytest.mark.parametrize("when", ["warming", "switching"])
async def test_sigterm_during_a_reload_answers_the_request_in_flight_and_exits_0(
    make_launcher: LauncherFactory, gate: Gate, port: int, tmp_path: Path, when: str
) -> None:
    flag = tmp_path / "deps-up"
    flag.touch()
    launcher = supervised_controlled(
        make_launcher, "--retry-max", "0.2", env={"TESTAPP_READY_FILE": str(flag)}
    )
    supervisor = await launcher.start()
    held = asyncio.create_task(get(HOST, port, "/hold/slow", timeout=60))
    await gate.wait_held("slow")
    mark = len(launcher.sink.messages)
    if when == "warming":
        flag.unlink()  # the new generation waits for its check: the reload is warming up
        launcher.send_signal(signal.SIGHUP)
        await wait_status(launcher, supervisor, "reloading: generation 2: 0/2", mark=mark)
    else:
        launcher.send_signal(signal.SIGHUP)
        await wait_status(launcher, supervisor, "draining 2 old worker(s)", mark=mark)
    launcher.send_signal(signal.SIGTERM)
    await launcher.wait_for(supervisor, lambda m: m.has("STOPPING", "1"), timeout=10)
    gate.release("slow")
    response = await held
    assert response.status == 200
    assert response.body == b"released slow\n"
    assert await launcher.stop(timeout=60) == ExitCode.OK
    log = supervisor.log_text()
    assert "exiting at once" not in log
    # after STOPPING=1 only STATUS=; a reload is never answered with READY=1 then
    stopping = next(i for i, m in enumerate(launcher.sink.messages) if m.has("STOPPING", "1"))
    assert all(set(m.fields) <= {"STATUS"} for m in launcher.sink.messages[stopping + 1 :]), (
        launcher.sink.messages[stopping:]
    )


# -- case 2: SIGHUP in single-process mode -----------------------------------------------------


async def test_single_process_survives_sighup_and_refuses_the_reload(
    make_launcher: LauncherFactory, gate: Gate, port: int
) -> None:
    launcher = make_launcher()  # --workers 0
    instance = await launcher.start()
    held = asyncio.create_task(get(HOST, port, "/hold/a", timeout=60))
    await gate.wait_held("a")
    mark = len(launcher.sink.messages)
    launcher.send_signal(signal.SIGHUP)
    refused = await wait_status(launcher, instance, "reload refused", mark=mark)
    assert "workers = 0" in refused.fields["STATUS"]
    code, out = await launcher.reload_command()
    assert code == 1, out
    assert "refused: sdserve serves in a single process (workers = 0)" in out
    assert not instance.exited.done()
    gate.release("a")
    assert (await held).status == 200
    assert (await get(HOST, port, "/")).status == 200
    assert await launcher.stop() == ExitCode.OK
    assert "reload refused" in instance.log_text()


# -- case 3: a failing replacement --------------------------------------------------------------


@pytest.mark.parametrize("cause", ["kill", "recycle"])
async def test_failing_replacement_never_stops_a_serving_service(
    supervised: MakeSupervised, port: int, tmp_path: Path, cause: str
) -> None:
    args = ["--crash-limit", "2"]
    if cause == "recycle":
        args += ["--max-requests", "20"]
    launcher = supervised(*args, workers=2)
    supervisor = await launcher.start()
    first = children(supervisor.pid)
    write_app(tmp_path / "app", "v2-broken", BAD_RELEASES["syntax-error"])  # mid-deploy
    mark = len(launcher.sink.messages)
    if cause == "kill":
        os.kill(first[0], signal.SIGKILL)
    else:
        for _ in range(60):  # bounded: both workers pass 20 requests (+ jitter 0)
            await get(HOST, port, "/")
    # more failed starts in a row than crash_limit, and still serving
    await wait_status(launcher, supervisor, ": 3 failed start(s) in a row", mark=mark)
    assert not supervisor.exited.done()
    assert await versions(port, 10) == {"v1"}
    write_app(tmp_path / "app", "v1")  # the deploy completes
    mark = len(launcher.sink.messages)
    await launcher.wait_for(
        supervisor,
        lambda m: m.fields.get("STATUS", "") == "generation 1: 2/2 workers ready",
        timeout=60,
        start=mark,
    )
    log = supervisor.log_text()
    # the broken code's file, line and caret, once (no frame of it ran: no "Traceback")
    assert (
        len(re.findall(r'^  File ".*relapp\.py", line \d+\n.*\n *\^+\nSyntaxError', log, re.M)) == 1
    )
    assert "Traceback" not in log, log
    assert await launcher.stop() == ExitCode.OK


# -- case 4: simultaneous deaths ------------------------------------------------------------------


async def test_workers_aborted_together_by_the_watchdog_are_replaced(
    make_launcher: LauncherFactory, gate: Gate, port: int
) -> None:
    # WatchdogSec=2s: pings every 1 s, a worker missing one for 2 s is aborted
    launcher = supervised_controlled(
        make_launcher,
        "--crash-limit",
        "2",
        "--crash-window",
        "0.2",
        env={"WATCHDOG_USEC": "2000000"},
    )
    supervisor = await launcher.start()
    stuck = children(supervisor.pid)
    blocked = [asyncio.create_task(get(HOST, port, "/block/a?s=30", timeout=60))]
    await gate.wait_held("block-a")
    # that worker's loop is stuck: the next connection goes to the other one
    blocked.append(asyncio.create_task(get(HOST, port, "/block/b?s=30", timeout=60)))
    await gate.wait_held("block-b")
    for pid in stuck:  # both aborted by the supervisor's watchdog
        await wait_exit(pid, timeout=30)
    mark = len(launcher.sink.messages)
    await launcher.wait_for(
        supervisor,
        lambda m: m.fields.get("STATUS", "").startswith("generation 1: 2/2 workers ready"),
        timeout=60,
        start=mark,
    )
    results = await asyncio.gather(*blocked, return_exceptions=True)
    assert all(isinstance(r, ProtocolError | ConnectionError) for r in results), results
    log = supervisor.log_text()
    assert log.count("sent no watchdog ping") == 2, log
    assert not supervisor.exited.done()
    assert len(children(supervisor.pid)) == 2
    assert (await get(HOST, port, "/")).status == 200
    assert await launcher.stop() == ExitCode.OK


# -- case 5: the config file changed on disk ---------------------------------------------------


async def test_replacements_use_the_supervisors_config_not_the_file(
    supervised: MakeSupervised, port: int, tmp_path: Path
) -> None:
    conf = tmp_path / "sdserve.toml"
    conf.write_text("shutdown_timeout = 7\n")
    launcher = supervised("--config", str(conf), workers=2)
    supervisor = await launcher.start()
    conf.write_text("shutdown_timeout = \n")  # an edit in progress
    mark = len(launcher.sink.messages)
    os.kill(children(supervisor.pid)[0], signal.SIGKILL)
    await launcher.wait_for(
        supervisor,
        lambda m: m.fields.get("STATUS", "").startswith("generation 1: 2/2 workers ready"),
        timeout=30,
        start=mark,
    )
    assert "not valid TOML" not in supervisor.log_text()
    # new configuration comes only with a reload, and this one is refused with its reason
    code, out = await launcher.reload_command()
    assert code == 1, out
    assert "the new configuration is invalid" in out
    assert str(conf) in out
    conf.write_text("shutdown_timeout = 8\n")
    code, out = await launcher.reload_command()
    assert code == 0, out
    assert await launcher.stop() == ExitCode.OK


# -- case 6: a new worker dies during the reload ----------------------------------------------


async def test_new_worker_that_dies_during_the_reload_is_replaced(
    supervised: MakeSupervised, port: int, tmp_path: Path, gate: Gate
) -> None:
    launcher = supervised("--warmup-parallel", "1", workers=2)
    supervisor = await launcher.start()
    # in v2, each worker's first check run reports to the gate and waits for its release
    check = (
        "    async def held():\n"
        "        import asyncio\n"
        f"        r, w = await asyncio.open_unix_connection({str(gate.path)!r})\n"
        "        w.write(f\"check-{os.environ['_SDSERVE_WORKER_ID']}\\n\".encode())\n"
        "        await r.read(1)\n"
        "        w.close()\n"
        "    add_check(app, 'held', held, timeout=60, continuous=False)\n"
    )
    write_app(tmp_path / "app", "v2", check)
    mark = len(launcher.sink.messages)
    launcher.send_signal(signal.SIGHUP)
    await gate.wait_held("check-3")
    gate.release("check-3")  # worker 3 is ready; worker 4 starts and waits
    await gate.wait_held("check-4")
    os.kill(worker_pid(supervisor, 3), signal.SIGKILL)
    await gate.wait_held("check-5")  # its replacement, in generation 2
    gate.release("check-4")
    gate.release("check-5")
    ready = await launcher.wait_for(
        supervisor, lambda m: m.has("READY", "1"), timeout=60, start=mark
    )
    assert "reloaded at" in ready.fields["STATUS"]
    assert len(children(supervisor.pid)) == 2
    assert await versions(port, 10) == {"v2"}
    assert await launcher.stop() == ExitCode.OK


# -- case 7: the watchdog and a slow start ----------------------------------------------------


async def test_watchdog_waits_for_ready(make_launcher: LauncherFactory) -> None:
    """An app that blocks for 2.5 s while it is built, under a 2 s watchdog."""
    launcher = supervised_controlled(
        make_launcher, env={"WATCHDOG_USEC": "2000000", "TESTAPP_SLOW_FACTORY": "2.5"}
    )
    supervisor = await launcher.start(timeout=60)
    assert "watchdog" not in supervisor.log_text()
    assert await launcher.stop() == ExitCode.OK


# -- case 8: reload_timeout and a long sequential warm-up --------------------------------------


async def test_reload_timeout_bounds_each_worker_not_the_whole_warm_up(
    make_launcher: LauncherFactory,
) -> None:
    # three workers warming one after the other, about 1.2 s each: over 3 s in all
    launcher = make_launcher(
        "--workers", "3", "--warmup-parallel", "1", "--reload-timeout", "2.5",
        env={"TESTAPP_WARMUP": "1.0"},
    )  # fmt: skip
    supervisor = await launcher.start(timeout=60)
    mark = len(launcher.sink.messages)
    code, out = await launcher.reload_command()
    assert code == 0, out
    during = launcher.sink.messages[mark:]
    extends = [m for m in during if "EXTEND_TIMEOUT_USEC" in m.fields]
    assert len(extends) >= 3  # each new worker moved systemd's bound
    assert [m.fields.get("READY") for m in during if "READY" in m.fields] == ["1"]
    assert await launcher.stop() == ExitCode.OK
    assert supervisor.exited.result() == 0


async def test_a_worker_over_reload_timeout_fails_the_reload_naming_the_timeout(
    make_launcher: LauncherFactory,
) -> None:
    launcher = make_launcher(
        "--workers", "1", "--reload-timeout", "1", env={"TESTAPP_WARMUP": "3"}
    )  # fmt: skip
    await launcher.start(timeout=60)
    code, out = await launcher.reload_command()
    assert code == 1, out
    assert "was not ready within reload_timeout (1s)" in out
    assert await launcher.stop() == ExitCode.OK


# -- case 9: drain_delay is for stops, not for reloads -----------------------------------------


async def test_reload_retires_without_drain_delay_and_old_workers_stay_ready(
    make_launcher: LauncherFactory, port: int
) -> None:
    # without the hand-over, which would move this connection to a new worker: the probes
    # must reach the draining one
    launcher = supervised_controlled(
        make_launcher, "--drain-delay", "5", "--idle-grace", "5", "--no-handover"
    )
    supervisor = await launcher.start()
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(request_bytes("/"))
        old_pid = (await read_response(reader)).body.split()[1]
        mark = len(launcher.sink.messages)
        launcher.send_signal(signal.SIGHUP)
        await wait_status(launcher, supervisor, "draining 2 old worker(s)", mark=mark)
        # the old worker drains, but the service is ready: a load balancer must not flap.
        # Probe on this connection, as a load balancer does, until the old worker, once it
        # has begun to drain, answers with Connection: close (bounded).
        for _ in range(1000):
            writer.write(request_bytes("/readyz"))
            probe = await read_response(reader)
            assert probe.status == 200, probe
            if probe.closes:
                break
        assert probe.closes
    finally:
        writer.close()
    await launcher.wait_for(supervisor, lambda m: m.has("READY", "1"), timeout=30, start=mark)
    log = supervisor.log_text()
    assert f"sdserve.worker[{old_pid.decode()}]: retiring" in log
    assert "reporting not ready for 5.0s" not in log
    assert await launcher.stop() == ExitCode.OK


# -- case 10: a failed reload fails `sdserve reload` ----------------------------------------


async def test_failed_reload_fails_sdserve_reload_and_systemd_returns_to_running(
    supervised: MakeSupervised, port: int, tmp_path: Path
) -> None:
    launcher = supervised("--start-timeout", "2", workers=2)
    supervisor = await launcher.start()
    write_app(tmp_path / "app", "v2-bad", BAD_RELEASES["failing-check"])
    mark = len(launcher.sink.messages)
    code, out = await launcher.reload_command()
    assert code == 1, out
    assert "failed: reload FAILED at" in out
    assert "db (ConnectionRefusedError: db is down)" in out
    kinds = [
        k for m in launcher.sink.messages[mark:] for k in ("RELOADING", "READY") if k in m.fields
    ]
    assert kinds == ["RELOADING", "READY"]  # systemd's reload job ends, the unit keeps running
    assert await versions(port, 10) == {"v1"}
    write_app(tmp_path / "app", "v3")
    code, out = await launcher.reload_command()
    assert code == 0, out
    assert await versions(port, 10) == {"v3"}
    assert await launcher.stop() == ExitCode.OK
    assert supervisor.exited.result() == 0


# -- case 12: start-up failures -------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
async def test_raising_startup_hook_exits_3_once_with_its_traceback_after_cleanup(
    make_launcher: LauncherFactory, tmp_path: Path, workers: int
) -> None:
    hooks = tmp_path / "hooks.log"
    launcher = make_launcher(
        "--workers",
        str(workers),
        env={"TESTAPP_STARTUP_RAISES": "1", "TESTAPP_HOOKS_LOG": str(hooks)},
    )
    instance = await launcher.spawn()
    assert await asyncio.wait_for(asyncio.shield(instance.exited), 60) == ExitCode.STARTUP
    log = instance.log_text()
    assert log.count("Traceback (most recent call last)") == 1, log
    assert "RuntimeError: the database said no" in log
    assert re.search(r"controlled\.py, line \d+", log), log
    assert "SDSERVE_APP_FILE=" in log
    # the cleanup hooks ran, last registered first; no shutdown hook (nothing was served)
    ran = hooks.read_text().split()
    if workers == 0:
        assert ran == ["cleanup-3", "cleanup-2", "cleanup-1"]
    else:  # each worker that built the app ran them (interleaved in the file)
        assert set(ran) == {"cleanup-3", "cleanup-2", "cleanup-1"}


async def test_factory_error_names_the_file_and_line(
    supervised: MakeSupervised, tmp_path: Path
) -> None:
    write_app(tmp_path / "app", "v1", "    raise KeyError('DATABASE_URL')\n")
    lines = (tmp_path / "app" / "relapp.py").read_text().splitlines()
    line = 1 + next(i for i, text in enumerate(lines) if "DATABASE_URL" in text)
    launcher = supervised(workers=2)
    instance = await launcher.spawn()
    assert await asyncio.wait_for(asyncio.shield(instance.exited), 60) == ExitCode.STARTUP
    log = instance.log_text()
    assert log.count("Traceback (most recent call last)") == 1, log
    where = f"relapp.py, line {line})"
    assert f"the factory raised KeyError: 'DATABASE_URL' (at {tmp_path}/app/{where}" in log, log
    stopping = [m for m in launcher.sink.messages if m.has("STOPPING", "1")]
    assert where in stopping[-1].fields["STATUS"]
