"""sdserve under a real systemd (PID 1 in a systemd-nspawn box), on systemd 252 and 254.

Every test boots its own box, installs the units and runs the demo app. Traffic stays inside
the box (its own 127.0.0.1). Synchronisation is on events: ``systemctl`` jobs (which return
when systemd has seen READY=1 or the stop finished), the journal, process exits.
"""

from __future__ import annotations

import contextlib
import json
import re
import select
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence

import pytest

from sdserve.units import UnitSpec, daemon_config, render_units, timeout_start_sec

from .conftest import shipped_units
from .testbed import BOX_TOOLS, Box, JournalEntry, message, wait_until

SERVICE = "sdserve.service"
DEMO_CONFIG = 'app = "sdserve.demo:create_app"\n'
FLAG_DIR = "/run/sds-test"
#: the demo's /block (stalls the event loop) exists only when asked for
ALLOW_BLOCK = {"DEMO_ALLOW_BLOCK": "1"}

Record = Callable[[str, str], None]


def install(
    box: Box,
    flavour: str,
    *,
    spec: UnitSpec | None = None,
    environment: dict[str, str] | None = None,
    service: Sequence[str] = (),
) -> None:
    """Install the shipped units (or units rendered from ``spec``), the demo's config, and a
    drop-in with test-only environment variables."""
    units = shipped_units() if spec is None else render_units(spec)
    lines = [f"Environment={k}={v}" for k, v in (environment or {}).items()] + list(service)
    if lines:
        units[f"{SERVICE}.d/90-test.conf"] = "[Service]\n" + "".join(f"{x}\n" for x in lines)
    box.write("/etc/sdserve/sdserve.toml", DEMO_CONFIG)
    box.run(["mkdir", "-p", FLAG_DIR])
    box.install_units(units)


def curl(box: Box, url: str, *extra: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return box.run(
        ["curl", "-sS", "--max-time", str(timeout), *extra, url], check=False, timeout=timeout + 10
    )


def from_unit(entry: JournalEntry, unit: str = SERVICE) -> bool:
    return unit in (entry.get("_SYSTEMD_UNIT"), entry.get("UNIT"))


def sdserve_entries(box: Box, cursor: str) -> list[JournalEntry]:
    return [e for e in box.journal(cursor=cursor, unit=SERVICE) if "SDSERVE_PHASE" in e]


def main_pid(box: Box, unit: str = SERVICE) -> int:
    return int(box.show(unit, "MainPID")["MainPID"])


def answered_by(box: Box, body: str, unit: str = SERVICE) -> bool:
    """Whether the demo's answer came from the unit's main process or one of its workers."""
    m = re.search(r"\(pid (\d+)\)", body)
    assert m, body
    pid, main = int(m.group(1)), main_pid(box, unit)
    if pid == main:
        return True
    ppid = box.run(["ps", "-o", "ppid=", "-p", str(pid)], check=False).stdout.strip()
    return ppid == str(main)


# ---- the units ---------------------------------------------------------------------------


def test_units_pass_verify_and_security(box: Box, flavour: str, record: Record) -> None:
    install(box, flavour)
    units = ["sdserve.socket", "sdserve-admin.socket", SERVICE]
    units += ["sdserve@demo.socket", "sdserve@demo.service"]
    res = box.run(["systemd-analyze", "verify", *units], check=False)
    assert res.returncode == 0, res.stderr
    # verify prints problems on stderr but can still exit 0 for some of them
    assert res.stderr.strip() == "", res.stderr
    for unit in units:  # the same units on every systemd version
        assert box.show(unit, "DropInPaths")["DropInPaths"] == ""

    sec = box.run(["systemd-analyze", "security", "--no-pager", SERVICE], check=False)
    m = re.search(r"Overall exposure level for sdserve\.service: (\d+\.\d+)", sec.stdout)
    assert m, sec.stdout + sec.stderr
    exposure = float(m.group(1))
    record("exposure (systemd-analyze security sdserve.service)", f"{exposure}")
    assert exposure <= 2.0, sec.stdout

    props = box.show(
        SERVICE, "Type", "KillMode", "Restart", "TimeoutStopUSec", "StartLimitIntervalUSec"
    )
    assert props["Type"] == "notify"
    assert props["StartLimitIntervalUSec"] == "0"
    assert props["KillMode"] == "mixed"
    assert props["Restart"] == "on-failure"
    assert props["TimeoutStopUSec"] == "35s"


# ---- activation and readiness ------------------------------------------------------------


def test_first_connection_activates_the_service(box: Box, flavour: str) -> None:
    install(box, flavour)
    box.systemctl("start", "sdserve.socket")
    assert box.show(SERVICE, "ActiveState")["ActiveState"] == "inactive"
    cursor = box.cursor()

    res = curl(box, "http://127.0.0.1:8080/")

    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("hello from sdserve demo")
    assert answered_by(box, res.stdout)
    # A worker may answer before the whole generation is ready: join the start job.
    box.systemctl("start", SERVICE)
    props = box.show(SERVICE, "ActiveState", "StatusText", "WatchdogUSec")
    assert props["ActiveState"] == "active"
    assert props["WatchdogUSec"] == "15s"
    assert re.search(r"serving on http=|\d+/\d+ workers ready", props["StatusText"]), props
    # only the http socket: the admin socket is optional and was not started
    sockets = [e for e in sdserve_entries(box, cursor) if e["SDSERVE_PHASE"] == "sockets"]
    assert [e["SDSERVE_SOCKETS"] for e in sockets] == ["http"]


def test_admin_socket_is_passed_once_enabled(box: Box, flavour: str) -> None:
    install(box, flavour)
    box.systemctl("start", "sdserve.socket", "sdserve-admin.socket", SERVICE)
    cursor = box.cursor()
    box.systemctl("restart", SERVICE)
    sockets = [e for e in sdserve_entries(box, cursor) if e["SDSERVE_PHASE"] == "sockets"]
    assert sorted(sockets[-1]["SDSERVE_SOCKETS"].split(",")) == ["admin", "http"]
    res = curl(box, "http://127.0.0.1:8081/livez", "--fail")
    assert res.returncode == 0, res.stderr
    assert curl(box, "http://127.0.0.1:8080/").stdout.startswith("hello")


@pytest.mark.parametrize(
    "workers",
    [
        pytest.param(0, id="in-process"),
        # the supervisor passes on what its starting workers wait for
        pytest.param(None, id="supervised"),
    ],
)
def test_ready_waits_for_the_check_and_status_shows_it(
    box: Box, flavour: str, workers: int | None
) -> None:
    flag = f"{FLAG_DIR}/ready"
    install(box, flavour, spec=UnitSpec(workers=workers), environment={"DEMO_WAIT_FILE": flag})
    box.systemctl("start", "sdserve.socket")
    cursor = box.cursor()
    # The first connection activates the service; the request waits in the socket's queue.
    with box.background(["curl", "-sS", "--max-time", "60", "http://127.0.0.1:8080/"]) as client:
        # The gate logs every failed attempt and sets STATUS= before the next one, so once
        # the second attempt is logged, the status of the first is there.
        box.wait_journal(
            lambda e: e.get("SDSERVE_CHECK") == "flag-file" and "(attempt 2)" in message(e),
            cursor=cursor,
            unit=SERVICE,
            timeout=30,
            what="a second failed attempt of the flag-file check",
        )
        status = box.systemctl("status", "--no-pager", SERVICE, check=False).stdout
        props = box.show(SERVICE, "ActiveState", "StatusText")
        assert props["ActiveState"] == "activating"
        assert "waiting for flag-file" in props["StatusText"]
        status_line = next(line for line in status.splitlines() if "Status:" in line)
        assert "waiting for flag-file" in status_line, status
        assert client.poll() is None, "the request was answered before the service was ready"

        box.run(["touch", flag])
        started = time.monotonic()
        box.systemctl("start", SERVICE)  # joins the start job: returns once READY=1 came
        ready_after = time.monotonic() - started

        out, err = client.communicate(timeout=30)
    assert client.returncode == 0, err
    assert out.startswith("hello from sdserve demo")
    assert box.show(SERVICE, "ActiveState")["ActiveState"] == "active"
    assert ready_after < 15  # the next attempt comes within retry_max (5 s) of the file
    phases = [(e["SDSERVE_PHASE"], e.get("SDSERVE_CHECK_OK")) for e in sdserve_entries(box, cursor)]
    # READY came after the check passed, never before
    assert phases.index(("checks", "1")) < phases.index(("ready", None))
    assert ("checks", "0") in phases


def test_critical_check_that_never_passes_fails_the_start(box: Box, flavour: str) -> None:
    spec = UnitSpec(start_timeout=3)
    # Restart=no keeps the failed state for inspection: with on-failure, systemd starts a new
    # attempt 500 ms later, and `systemctl status` shows that one.
    install(
        box,
        flavour,
        spec=spec,
        environment={"DEMO_WAIT_FILE": f"{FLAG_DIR}/never"},
        service=["Restart=no"],
    )
    box.systemctl("start", "sdserve.socket")
    cursor = box.cursor()

    started = time.monotonic()
    res = box.systemctl("start", SERVICE, check=False, timeout=60)
    took = time.monotonic() - started

    assert res.returncode != 0
    limit = timeout_start_sec(daemon_config(spec))
    assert took < limit, f"start took {took:.1f} s, TimeoutStartSec={limit}"
    assert took >= 3
    failed = box.wait_journal(
        lambda e: from_unit(e) and "Failed with result" in message(e),
        cursor=cursor,
        timeout=10,
        what="systemd's failure message",
    )
    # sdserve gave up itself (exit code), before systemd's own timeout
    assert "'exit-code'" in message(failed)
    entries = box.journal(cursor=cursor, unit=SERVICE)
    texts = [message(e) for e in entries]
    assert any("flag-file" in t and "did not pass" in t for t in texts), texts
    assert any(
        e.get("SDSERVE_CHECK") == "flag-file" and e.get("SDSERVE_CHECK_OK") == "0" for e in entries
    )
    status = box.systemctl("status", "--no-pager", "--lines=20", SERVICE, check=False).stdout
    assert "Active: failed (Result: exit-code)" in status, status
    assert "flag-file" in status, status


def test_journal_has_sdserve_fields(box: Box, flavour: str) -> None:
    install(box, flavour, environment={"DEMO_WAIT_FILE": f"{FLAG_DIR}/ok"})
    box.run(["touch", f"{FLAG_DIR}/ok"])
    cursor = box.cursor()
    box.systemctl("start", SERVICE)
    entries = sdserve_entries(box, cursor)
    by_phase = {e["SDSERVE_PHASE"]: e for e in entries}
    assert {"sockets", "checks", "ready"} <= set(by_phase), by_phase.keys()
    for e in entries:
        assert e["_SYSTEMD_UNIT"] == SERVICE
        assert "PRIORITY" in e
        assert "CODE_FILE" in e
    assert by_phase["checks"]["SDSERVE_CHECK"] == "flag-file"
    assert by_phase["checks"]["SDSERVE_CHECK_OK"] == "1"
    # each process that serves logs how long its start took (the supervisor, if any, adds
    # its own "ready" with the worker count)
    ready = [e for e in entries if e["SDSERVE_PHASE"] == "ready"]
    assert any(float(e.get("SDSERVE_DURATION_MS", -1)) >= 0 for e in ready), ready
    # the fields can be matched on, as an operator would
    # (the box booted for this test, so its journal holds this one start only)
    matched = box.journal(args=["SDSERVE_PHASE=ready"])
    assert matched
    assert {e["SDSERVE_PHASE"] for e in matched} == {"ready"}


# ---- restarts, stop, watchdog --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_twenty_restarts_under_load_lose_nothing(box: Box, flavour: str, record: Record) -> None:
    install(box, flavour)
    box.systemctl("start", "sdserve.socket", SERVICE)
    pids = [main_pid(box)]
    cursor = box.cursor()
    restart_times = []
    # 8 busy keep-alive clients, 8 new-connection-per-request clients, and 4 keep-alive
    # clients idle for 0.3 s between requests (inside sdserve's 1 s idle grace)
    with box.load(
        path="/slow?ms=10", keepalive=8, fresh=8, paced=4, pause=0.3, max_seconds=400
    ) as load:
        for _ in range(20):
            # Manual restarts count against the start rate limit (5 in 10 s) that guards
            # against crash loops; a deploy this frequent is the test's, not an operator's.
            box.systemctl("reset-failed", SERVICE)
            started = time.monotonic()
            box.systemctl("restart", SERVICE)  # returns once the new process sent READY=1
            restart_times.append(time.monotonic() - started)
            pids.append(main_pid(box))
        # the new process must be serving the load too before it ends
        res = curl(box, "http://127.0.0.1:8080/")
        result = load.finish()
    assert res.returncode == 0, res.stderr
    record(
        "20 restarts under load",
        f"{result.summary()}; restart {max(restart_times):.2f} s at most",
    )
    assert len(set(pids)) == 21, f"not 21 distinct processes: {pids}"
    assert result.hung_clients == 0
    assert result.failed == 0, result.summary() + "\n" + "\n".join(result.examples)
    assert result.ok == result.requests > 20 * 16
    for kind in ("keepalive", "fresh", "paced"):
        assert result.by_kind[kind]["requests"] > 0, kind
    # the keep-alive clients kept their connections: handed over through the fd store
    for kind in ("keepalive", "paced"):
        assert result.by_kind[kind]["closed_by_server"] == 0, result.by_kind[kind]
    # every process drained (one per worker and restart), none cancelled a request
    drains = [e for e in sdserve_entries(box, cursor) if e["SDSERVE_PHASE"] == "drained"]
    assert len(drains) >= 20
    assert all(e.get("SDSERVE_CANCELLED") == "0" for e in drains)


def test_stop_completes_requests_in_flight(box: Box, flavour: str) -> None:
    install(box, flavour)
    box.systemctl("start", "sdserve.socket", SERVICE)
    n = 6
    with contextlib.ExitStack() as stack:
        clients = [
            stack.enter_context(
                box.background(
                    ["curl", "-sS", "--max-time", "30", "http://127.0.0.1:8080/slow?ms=2500"]
                )
            )
            for _ in range(n)
        ]

        # In flight = accepted by sdserve (a connection still in the listen queue belongs to
        # no process yet): the socket table is the only place that says so.
        def accepted() -> bool:
            out = box.run(["ss", "-Htnp", "state", "established", "( sport = :8080 )"]).stdout
            return out.count("users:") == n

        wait_until(accepted, timeout=20, what=f"{n} connections accepted by sdserve")
        cursor = box.cursor()
        started = time.monotonic()
        box.systemctl("stop", SERVICE)
        took = time.monotonic() - started
        results = [c.communicate(timeout=30) for c in clients]
    assert [c.returncode for c in clients] == [0] * n, results
    assert all(out == "slept 2500 ms\n" for out, _ in results), results
    assert took < 2.5 + 5, f"stop took {took:.1f} s"
    assert box.show(SERVICE, "ActiveState", "Result") == {
        "ActiveState": "inactive",
        "Result": "success",
    }
    drained = [e for e in sdserve_entries(box, cursor) if e["SDSERVE_PHASE"] == "drained"]
    assert sum(int(e["SDSERVE_REQUESTS"]) for e in drained) == n
    assert all(e["SDSERVE_CANCELLED"] == "0" for e in drained)


def test_blocked_event_loop_trips_systemds_watchdog(box: Box, flavour: str) -> None:
    """Served in the main process (--workers 0): systemd's watchdog restarts the service."""
    install(box, flavour, spec=UnitSpec(watchdog=3, workers=0), environment=ALLOW_BLOCK)
    box.systemctl("start", "sdserve.socket", SERVICE)
    pid = main_pid(box)
    cursor = box.cursor()
    block = ["curl", "-sS", "--max-time", "60", "http://127.0.0.1:8080/block?ms=30000"]
    with box.background(block) as blocked:
        timeout_entry = box.wait_journal(
            lambda e: from_unit(e) and "Watchdog timeout" in message(e),
            cursor=cursor,
            timeout=20,
            what="systemd's watchdog timeout",
        )
        box.wait_journal(
            lambda e: from_unit(e) and "Failed with result 'watchdog'" in message(e),
            cursor=cursor,
            timeout=20,
            what="the watchdog failure",
        )
        box.wait_journal(
            lambda e: from_unit(e) and message(e).startswith("Started sdserve.service"),
            cursor=cursor,
            timeout=30,
            what="the restart",
        )
        blocked.communicate(timeout=30)
    assert "limit 3s" in message(timeout_entry)
    props = box.show(SERVICE, "ActiveState", "MainPID", "NRestarts", "WatchdogUSec")
    assert props["ActiveState"] == "active"
    assert props["WatchdogUSec"] == "3s"
    assert int(props["NRestarts"]) >= 1
    assert int(props["MainPID"]) != pid
    assert blocked.returncode != 0, "the blocked request cannot be answered: its process died"
    assert curl(box, "http://127.0.0.1:8080/").stdout.startswith("hello from sdserve demo")


def test_blocked_worker_is_replaced_under_the_watchdog(box: Box, flavour: str) -> None:
    """With workers, the supervisor keeps systemd's watchdog fed and replaces the worker whose
    loop is blocked; the journal says which and why."""
    install(box, flavour, spec=UnitSpec(watchdog=3, workers=2), environment=ALLOW_BLOCK)
    box.systemctl("start", "sdserve.socket", SERVICE)
    pid = main_pid(box)
    cursor = box.cursor()
    block = ["curl", "-sS", "--max-time", "60", "http://127.0.0.1:8080/block?ms=30000"]
    with box.background(block) as blocked:
        missed = box.wait_journal(
            lambda e: e.get("SDSERVE_PHASE") == "watchdog",
            cursor=cursor,
            unit=SERVICE,
            timeout=20,
            what="the supervisor's watchdog report",
        )
        replaced = box.wait_journal(
            lambda e: e.get("SDSERVE_PHASE") == "worker-ready",
            cursor=missed["__CURSOR"],
            unit=SERVICE,
            timeout=30,
            what="a replacement worker",
        )
        blocked.communicate(timeout=30)
    assert "event loop blocked" in message(missed)
    assert replaced["SDSERVE_WORKER"] != missed["SDSERVE_WORKER"]
    props = box.show(SERVICE, "ActiveState", "MainPID", "NRestarts")
    assert props == {"ActiveState": "active", "MainPID": str(pid), "NRestarts": "0"}
    assert blocked.returncode != 0
    assert curl(box, "http://127.0.0.1:8080/").stdout.startswith("hello from sdserve demo")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_reload_under_load_keeps_the_main_process(box: Box, flavour: str, record: Record) -> None:
    """``systemctl reload`` runs ``sdserve reload $MAINPID``, which returns once the reload is
    done, on 252 and 254 alike: same MainPID, no failed request."""
    install(box, flavour)
    box.systemctl("start", "sdserve.socket", SERVICE)
    pid = main_pid(box)
    cursor = box.cursor()
    took = []
    with box.load(
        path="/slow?ms=10", keepalive=8, fresh=8, max_seconds=300, max_requests=400_000
    ) as load:
        for _ in range(20):
            started = time.monotonic()
            box.systemctl("reload", SERVICE)  # fails unless the reload succeeded
            took.append(time.monotonic() - started)
            # sdserve logs the end of the reload before it answers `sdserve reload`
            end = wait_reload_end(box, cursor)
            assert end["SDSERVE_PHASE"] == "reloaded"
            cursor = end["__CURSOR"]
            assert box.show(SERVICE, "ActiveState")["ActiveState"] == "active"
        result = load.finish()
    record("20 reloads under load", f"{result.summary()}; reload {max(took):.2f} s at most")
    assert main_pid(box) == pid
    assert result.failed == 0, result.summary() + "\n" + "\n".join(result.examples)
    assert result.hung_clients == 0
    assert result.ok == result.requests > 0
    # the keep-alive clients kept their connections: handed to the new workers
    assert result.by_kind["keepalive"]["closed_by_server"] == 0, result.by_kind["keepalive"]


def wait_reload_end(box: Box, cursor: str, timeout: float = 150) -> JournalEntry:
    """The journal entry that ends the next reload after ``cursor``. The bound is generous: in
    one CI rehearsal a box's journal went silent for over 60 s; if a wait ever reaches it, the
    dump of the processes and the journal says why."""
    try:
        return box.wait_journal(
            lambda e: e.get("SDSERVE_PHASE") in ("reloaded", "reload-failed"),
            cursor=cursor,
            unit=SERVICE,
            timeout=timeout,
            what="the end of the reload",
        )
    except TimeoutError as exc:
        ps = box.run(["ps", "-eo", "pid,ppid,stat,etime,wchan:24,cmd"], check=False)
        tail = box.run(
            ["journalctl", "--no-pager", "-n", "80", "-o", "short-monotonic"], check=False
        )
        raise TimeoutError(f"{exc}\n-- ps:\n{ps.stdout}\n-- journal:\n{tail.stdout}") from exc


# ---- templates ---------------------------------------------------------------------------


def test_template_runs_several_apps(box: Box, flavour: str) -> None:
    install(box, flavour)
    for app in ("shop", "blog"):
        box.write(f"/etc/sdserve/{app}.toml", DEMO_CONFIG)
    box.systemctl("start", "sdserve@shop.socket", "sdserve@blog.socket")
    answers = {}
    for app in ("shop", "blog"):
        res = curl(box, "http://localhost/", "--unix-socket", f"/run/sdserve/{app}.sock")
        assert res.returncode == 0, res.stderr
        answers[app] = res.stdout
        unit = f"sdserve@{app}.service"
        assert answered_by(box, res.stdout, unit)
        box.systemctl("start", unit)  # joins the start job
        assert box.show(unit, "ActiveState")["ActiveState"] == "active"
    assert answers["shop"] != answers["blog"]


def test_sdserve_units_renders_working_units(box: Box, flavour: str) -> None:
    """`sdserve units` run inside the box: the units it writes verify, start and serve, with a
    fixed user from its sysusers.d entry and an admin socket."""
    out = "/tmp/rendered"
    box.run(
        [
            "sdserve",
            "units",
            "--name=shop",
            "--app=sdserve.demo:create_app",
            "--listen=127.0.0.1:9000",
            "--listen=[::1]:9000",
            "--admin-listen=127.0.0.1:9001",
            "--user=shop",
            "--environment-file=-/etc/shop.env",
            "--workers=1",
            "--shutdown-timeout=10",
            "--watchdog=5",
            f"--out={out}",
        ]
    )
    files = box.run(["find", out, "-type", "f", "-printf", "%P\\n"]).stdout.split()
    expected = {"shop.socket", "shop-admin.socket", "shop.service", "sysusers.d/shop.conf"}
    assert set(files) == expected
    box.sh(
        f"cp -r {out}/shop* /etc/systemd/system/ && mkdir -p /etc/sysusers.d"
        f" && cp {out}/sysusers.d/shop.conf /etc/sysusers.d/"
        " && systemd-sysusers && systemctl daemon-reload"
    )
    units = ["shop.socket", "shop-admin.socket", "shop.service"]
    verify = box.run(["systemd-analyze", "verify", *units], check=False)
    assert verify.returncode == 0, verify.stderr
    assert verify.stderr.strip() == "", verify.stderr

    box.systemctl("start", "shop.socket", "shop-admin.socket")
    for url in ("http://127.0.0.1:9000/", "http://[::1]:9000/"):
        res = curl(box, url)
        assert res.returncode == 0, res.stderr
        assert answered_by(box, res.stdout, "shop.service")
    assert curl(box, "http://127.0.0.1:9001/livez", "--fail").returncode == 0
    box.systemctl("start", "shop.service")  # joins the start job
    props = box.show("shop.service", "User", "TimeoutStopUSec", "WatchdogUSec", "ActiveState")
    assert props == {
        "User": "shop",
        "TimeoutStopUSec": "20s",  # 0 drain delay + 10 shutdown + 5 cleanup + 5 margin
        "WatchdogUSec": "5s",
        "ActiveState": "active",
    }
    owner = box.run(["ps", "-o", "user=", "-p", str(main_pid(box, "shop.service"))]).stdout
    assert owner.strip() == "shop"


# ---- connections handed over -------------------------------------------------------------


@contextlib.contextmanager
def idle_clients(box: Box, n: int) -> Iterator[Callable[[str], dict[str, object]]]:
    """``n`` idle keep-alive connections held by ``box/idle.py`` in the box; yields a function
    that sends it a command (``reuse``, ``closed``) and returns its answer."""
    argv = ["python3", f"{BOX_TOOLS}/idle.py", f"--connections={n}", "--timeout=20"]
    with subprocess.Popen(
        box.command(argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        stdin, stdout = proc.stdin, proc.stdout

        def ask(command: str) -> dict[str, object]:
            stdin.write(command + "\n")
            stdin.flush()
            readable, _, _ = select.select([stdout], [], [], 60)
            assert readable, f"idle.py did not answer {command!r}"
            answer: dict[str, object] = json.loads(stdout.readline())
            return answer

        try:
            readable, _, _ = select.select([stdout], [], [], 60)
            assert readable, "idle.py did not start"
            assert stdout.readline().strip() == f"idle {n}"
            yield ask
        finally:
            stdin.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def stored(box: Box) -> int:
    return int(box.show(SERVICE, "NFileDescriptorStore")["NFileDescriptorStore"])


def test_idle_connections_outlive_a_restart_and_a_stop_closes_them(
    box: Box, flavour: str, record: Record
) -> None:
    install(box, flavour)
    box.systemctl("start", "sdserve.socket", SERVICE)
    cursor = box.cursor()
    with idle_clients(box, 12) as ask:
        for _ in range(3):
            box.systemctl("restart", SERVICE)
            # the new instance took them out of the store at once, and serves them
            assert stored(box) == 0
            assert ask("reuse") == {"ok": 12, "failed": {}}
        box.systemctl("stop", SERVICE)
        assert stored(box) == 0
        answer = ask("closed")
    record("idle connections through 3 restarts, then a stop", f"{answer}")
    assert answer == {"closed": 12, "open": 0}  # seen closed from the client side
    # ExecStop= (sdserve stopping) told each restart from the stop, which drained instead
    decisions = [
        message(e) for e in sdserve_entries(box, cursor) if e["SDSERVE_PHASE"] == "handover"
    ]
    restarts = [d for d in decisions if d.startswith("a restart")]
    assert len(restarts) == 3, decisions
    assert all("ExecStop= said so" in d for d in restarts), decisions
    assert sum(d.startswith("not a restart") for d in decisions) == 1, decisions


def test_a_restart_that_fails_to_start_leaks_no_stored_connection(box: Box, flavour: str) -> None:
    flag = f"{FLAG_DIR}/ok"
    install(
        box,
        flavour,
        spec=UnitSpec(start_timeout=3),
        environment={"DEMO_WAIT_FILE": flag},
        service=["Restart=no"],
    )
    box.run(["touch", flag])
    box.systemctl("start", "sdserve.socket", SERVICE)
    with idle_clients(box, 6) as ask:
        # the next instance fails its start: its critical check never passes
        box.run(["rm", flag])
        assert box.systemctl("restart", SERVICE, check=False).returncode != 0
        answer = ask("closed")
    assert answer == {"closed": 6, "open": 0}
    assert stored(box) == 0
