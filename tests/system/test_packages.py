"""The deb and rpm packages of ``packaging/`` in a real systemd (issue 7).

The packages are built by ``packaging/build.py`` (``make packages-test``; the session fixture
asks it again, which costs nothing when they are current): the release deb (lintian-clean),
a newer build of the same sources (``+b2``, the upgrade), and the rpm. Each deb test boots a
fresh box and installs with the box's own dpkg, so the maintainer scripts run against the
box's systemd (252 and 254). The rpm is installed with ``rpm --root`` on the host (payload),
and its scriptlets run in a box, in the order rpm runs them on install, upgrade and erase.

Synchronisation is on events only: dpkg and systemctl return when their jobs are done, the
load client reports its totals when told to stop.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from . import hostservices
from .test_shipped_units import documented_exposure, exposure
from .testbed import Box, message

# The first test of a session may build the packages (about 2 minutes when the sources
# changed; `make packages-test` normally did it before), hence the long upper bound.
pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]

CHECKOUT = Path(__file__).resolve().parents[2]
BUILD = CHECKOUT / "packaging" / "build.py"
SOCKET = "sdserve.socket"
SERVICE = "sdserve.service"
CONFFILE = "/etc/sdserve/sdserve.toml"
# the package's command (the box's PATH starts with the test bed's own venv)
PKG_SDSERVE = "/usr/bin/sdserve"
Record = Callable[[str, str], None]
# What an operator writes into the packaged conffile, which names no application.
DEMO_CONFIG = 'app = "sdserve.demo:create_app"\nlog = "auto"\n'
# Where the box finds the machine's PostgreSQL (its socket folder) and Redis (a forwarder's
# socket), bind-mounted by the fixture `services_box`.
BOX_PG_DIR = "/srv/host/postgresql"
BOX_REDIS_DIR = "/srv/host/redis"
CHECKS_CONFIG = f"""app = "sdserve.demo:create_app"
log = "auto"

[checks.pg]
type = "postgres"
dsn = "postgresql://postgres@/test?host={BOX_PG_DIR}"

[checks.redis]
type = "redis"
url = "unix://{BOX_REDIS_DIR}/redis.sock"
"""

# What remove + purge must leave behind: nothing of the package. Besides every path that
# `dpkg -L sdserve` listed, these are checked by name (created by the maintainer scripts,
# systemd or deb-systemd-helper, so dpkg does not list them):
LEFTOVERS = (
    "/etc/sdserve",  # the conffile's folder (purge)
    "/opt/sdserve",  # the venv, and the byte code that postinst compiled into it
    "/run/sdserve",  # the tmpfiles.d folder
    "/etc/systemd/system/sockets.target.wants/sdserve.socket",  # enabled by postinst
    "/var/lib/systemd/deb-systemd-helper-enabled/sdserve.socket.dsh-also",
    "/var/lib/systemd/deb-systemd-helper-enabled/sockets.target.wants/sdserve.socket",
    "/var/lib/systemd/deb-systemd-helper-enabled/sdserve.service.dsh-also",
    "/var/lib/systemd/deb-systemd-helper-enabled/sdserve-admin.socket.dsh-also",
    "/var/lib/dpkg/info/sdserve.list",  # dpkg's own record of the package
)
# New paths that may appear in a box between the two snapshots whatever is installed: logs,
# dpkg's rotated database copies, and the .deb we copied in.
NOISE_PREFIXES = (
    "/root/sdserve_",
    "/var/log/",
    "/run/log/",
    "/var/lib/dpkg/status-old",
    "/var/lib/dpkg/diversions-old",
    "/var/lib/dpkg/statoverride-old",
)


@dataclass(frozen=True)
class Packages:
    deb: Path
    deb_next: Path
    rpm: Path
    example: Path


def build(*args: str, script: Path = BUILD, env: dict[str, str] | None = None) -> Path:
    res = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env=env,
    )
    if res.returncode != 0:
        raise RuntimeError(f"build.py {shlex.join(args)} failed:\n{res.stderr[-5000:]}")
    return Path(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def packages(testbed: None) -> Packages:
    """The packages under test, built (or found current) once per session."""
    cache = Path(os.environ.get("SDS_PKG_CACHE") or CHECKOUT / ".cache" / "packaging")
    out = str(cache / "test")
    return Packages(
        deb=build("deb", "--out", out, "--no-lint"),
        deb_next=build("deb", "--out", out, "--rebuild", "2", "--no-lint"),
        rpm=build("rpm", "--out", out, "--no-lint"),
        example=build("example", "--out", out, "--no-lint"),
    )


# packaging/ and units/ of 0.1.0-1, the first package (git archive of commit 9ecaf44, kept
# here so that a checkout without history can build it): it enabled and started
# sdserve.socket on install, and its conffile served the demo application.
PREVIOUS_PACKAGING = Path(__file__).parent / "data" / "packaging-0.1.0-1.tar.gz"


@pytest.fixture(scope="session")
def previous_deb(packages: Packages) -> Path:
    """0.1.0-1 as an upgrade starts from it: its packaging/ (maintainer scripts, conffile,
    drop-ins, enablement) around the venv of today's build (today's build.py, so the
    cached venv is shared). What the upgrade test depends on is the packaging."""
    tree = packages.deb.parent.parent / "previous"
    # extracted again over the last one (the same files), so that build.py finds its deb
    # current when nothing changed
    tree.mkdir(exist_ok=True)
    subprocess.run(
        ["tar", "-C", str(tree), "-xzf", str(PREVIOUS_PACKAGING)], check=True, timeout=60
    )
    script = tree / "packaging" / "build.py"
    script.write_bytes(BUILD.read_bytes())
    env = dict(os.environ, SDS_TEST_SOURCE=os.environ.get("SDS_TEST_SOURCE") or str(CHECKOUT))
    deb = build("deb", "--out", str(tree / "out"), "--no-lint", script=script, env=env)
    assert deb.name.startswith("sdserve_0.1.0-1_"), deb
    return deb


@pytest.fixture
def services_box(testbed: None, flavour: str) -> Iterator[Box]:
    """A box that reaches the machine's PostgreSQL (its socket folder, bind-mounted) and
    Redis (through a forwarder on the host, from a unix socket in a bind-mounted folder)."""
    problems = hostservices.missing()
    if problems:
        pytest.fail("the machine's servers: " + "; ".join(problems), pytrace=False)
    forwarder = hostservices.UnixForwarder(hostservices.REDIS, "redis.sock")
    workdir = Path(tempfile.mkdtemp(prefix="sds-box-"))
    try:
        binds = [
            (hostservices.PG_SOCKET_DIR.resolve(), BOX_PG_DIR),
            (forwarder.folder, BOX_REDIS_DIR),
        ]
        b = Box.boot(flavour, workdir=workdir, binds=binds)
        try:
            yield b
        finally:
            b.stop()
    finally:
        forwarder.close()
        subprocess.run(["rm", "-rf", str(workdir)], check=False)


# ---- helpers -------------------------------------------------------------------------------


def configure(box: Box, config: str = DEMO_CONFIG) -> None:
    """What the operator does after the install: name the application, enable the socket."""
    box.write(CONFFILE, config)
    box.systemctl("enable", "--now", SOCKET)


def assert_checks_pass(box: Box) -> dict[str, dict[str, str]]:
    """`sdserve check` of the conffile (CHECKS_CONFIG) with the package's own sdserve: both
    built-in checks pass against the machine's servers."""
    target = box.run(["readlink", "-f", PKG_SDSERVE]).stdout.strip()
    assert target == "/opt/sdserve/bin/sdserve", target
    res = box.run([PKG_SDSERVE, "check", "--config", CONFFILE, "--format", "json"], check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    checks = {c["name"]: c for c in json.loads(res.stdout)["checks"]}
    assert set(checks) == {"pg", "redis"}, checks
    assert checks["pg"]["status"] == "pass", checks["pg"]
    assert checks["pg"]["output"].startswith("PostgreSQL "), checks["pg"]
    assert checks["redis"]["status"] == "pass", checks["redis"]
    assert checks["redis"]["output"] == "PONG", checks["redis"]
    return checks


def assert_service_ready_with_checks(box: Box) -> None:
    """The service, started by the socket, became ready (READY=1 waits for the critical
    checks) and its /readyz lists both checks as passing."""
    box.systemctl("start", SERVICE)  # returns once READY=1 came
    assert box.show(SERVICE, "ActiveState")["ActiveState"] == "active"
    res = curl(box, "http://127.0.0.1:8080/readyz?verbose")
    assert res.returncode == 0, res.stderr
    assert "[+]pg ok" in res.stdout, res.stdout
    assert "[+]redis ok" in res.stdout, res.stdout


def upload(box: Box, source: Path, dest: str) -> None:
    """Copy a host file into the box (binary-safe)."""
    subprocess.run(
        box.command(["sh", "-c", 'cat > "$1"', "sh", dest]),
        input=source.read_bytes(),
        check=True,
        timeout=60,
    )


def dpkg(box: Box, *args: str) -> subprocess.CompletedProcess[str]:
    return box.run(["dpkg", *args], timeout=180)


def install(box: Box, deb: Path) -> subprocess.CompletedProcess[str]:
    dest = f"/root/{deb.name}"
    upload(box, deb, dest)
    return dpkg(box, "-i", dest)


def forget_testbed_command(box: Box) -> None:
    """The test rootfs links /usr/bin/sdserve to its own venv (for the other system tests);
    remove it so that the box holds no sdserve of any kind before the package comes."""
    box.run(["rm", "-f", "/usr/bin/sdserve"])


def listening(box: Box, port: int = 8080) -> str:
    return box.run(["ss", "-Htlnp", f"( sport = :{port} )"]).stdout.strip()


def curl(box: Box, url: str = "http://127.0.0.1:8080/") -> subprocess.CompletedProcess[str]:
    return box.run(["curl", "-sS", "--max-time", "30", url], check=False, timeout=40)


def main_pid(box: Box) -> int:
    return int(box.show(SERVICE, "MainPID")["MainPID"])


def snapshot(box: Box) -> set[str]:
    """Every path of the box's file systems (/ and the tmpfs on /run), but /proc, /sys, /dev."""
    prune = ["(", "-path", "/proc", "-o", "-path", "/sys", "-o", "-path", "/dev", ")", "-prune"]
    out = box.run(["find", "/", "/run", "-xdev", *prune, "-o", "-print"], timeout=120).stdout
    return set(out.splitlines())


def payload_paths(deb: Path) -> list[str]:
    """Every path in a .deb's data archive, as installed (``/etc``, ``/opt/sdserve/...``)."""
    tar = subprocess.run(
        f"dpkg-deb --fsys-tarfile {shlex.quote(str(deb))} | tar -t",
        shell=True,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    paths = {"/" + line.removeprefix("./").rstrip("/") for line in tar.splitlines()}
    return sorted(paths - {"/"})


def existing(box: Box, paths: list[str]) -> set[str]:
    """Those of ``paths`` that exist in the box (as a file, folder or symlink)."""
    script = 'for p; do if [ -e "$p" ] || [ -L "$p" ]; then echo "$p"; fi; done'
    return set(box.run(["sh", "-c", script, "sh", *paths], timeout=120).stdout.splitlines())


def exists(box: Box, path: str) -> bool:
    return box.run(["test", "-e", path], check=False).returncode == 0 or (
        box.run(["test", "-L", path], check=False).returncode == 0
    )


def user_processes(box: Box, user: str) -> int:
    return box.run(["ps", "-eo", "user:32=,pid=,args="]).stdout.count(f"{user} ")


# ---- the deb ---------------------------------------------------------------------------------


def test_install_serves_nothing_until_an_app_is_configured(
    box: Box, flavour: str, packages: Packages, record: Record
) -> None:
    forget_testbed_command(box)
    res = install(box, packages.deb)
    assert "Setting up sdserve (" in res.stdout
    # the one line that tells the operator what to do
    assert "sdserve: no application configured: set app = " in res.stderr, res.stderr
    assert "systemctl enable --now sdserve.socket" in res.stderr

    # nothing is enabled, started or listening
    sock = box.show(SOCKET, "ActiveState", "UnitFileState")
    assert sock == {"ActiveState": "inactive", "UnitFileState": "disabled"}
    assert listening(box) == ""
    svc = box.show(SERVICE, "ActiveState", "UnitFileState", "User", "Type", "DropInPaths")
    assert svc["ActiveState"] == "inactive"
    assert svc["UnitFileState"] == "disabled"
    assert svc["User"] == "sdserve"
    # the same units on every systemd version: reloads go through `sdserve reload`
    assert svc["Type"] == "notify"
    dropins = [path.split("/")[-2:] for path in svc["DropInPaths"].split()]
    assert dropins == [["sdserve.service.d", "40-package.conf"]], svc["DropInPaths"]
    # the template's instances are not made to share the user sdserve
    tmpl = box.show("sdserve@x.service", "DropInPaths")["DropInPaths"]
    assert "40-package.conf" not in tmpl, tmpl
    assert box.run(["systemd-analyze", "verify", SOCKET, SERVICE]).stderr.strip() == ""
    # the package's drop-in (a static user) keeps the exposure that units/README.md states
    score = exposure(box, SERVICE)
    record("exposure of the packaged sdserve.service (loaded)", score)
    assert score == documented_exposure()[flavour, SERVICE][0]
    conffiles = box.run(["dpkg-query", "-W", "-f=${Conffiles}", "sdserve"]).stdout
    assert CONFFILE in conffiles
    assert box.run([PKG_SDSERVE, "config", "-c", CONFFILE]).stdout.startswith('app = ""')

    # started by hand without an app: it fails once, with the line that names the key, and
    # exit status 2 is not restarted (the unit is "failed", not waiting to restart)
    cursor = box.cursor()
    res = box.systemctl("start", SERVICE, check=False)
    assert res.returncode != 0
    svc = box.show(SERVICE, "ActiveState", "SubState", "Result", "ExecMainStatus", "NRestarts")
    assert svc == {
        "ActiveState": "failed",
        "SubState": "failed",
        "Result": "exit-code",
        "ExecMainStatus": "2",
        "NRestarts": "0",
    }, svc
    box.wait_journal(
        lambda e: "app: no application given" in message(e),
        cursor=cursor,
        unit=SERVICE,
        what="sdserve's line about the missing app",
    )
    # (the start pulled in the socket through Requires=: stop it before configuring)
    box.systemctl("stop", SOCKET)
    box.systemctl("reset-failed", SERVICE)

    # the operator names the application and enables the socket: it listens (loopback
    # only), owned by PID 1, and the first request starts the service, which answers it
    configure(box)
    assert box.show(SOCKET, "ActiveState", "SubState", "UnitFileState") == {
        "ActiveState": "active",
        "SubState": "listening",
        "UnitFileState": "enabled",
    }
    ss = listening(box)
    assert 'users:(("systemd",pid=1,' in ss
    assert " 127.0.0.1:8080 " in ss, ss
    res = curl(box)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("hello from sdserve demo")
    # a worker may answer before the supervisor's READY=1: wait for the start job to end
    assert box.show(SERVICE, "ActiveState")["ActiveState"] in ("activating", "active")
    box.systemctl("start", SERVICE)  # joins the start job the socket queued
    assert box.show(SERVICE, "ActiveState")["ActiveState"] == "active"
    pid = main_pid(box)
    owner = box.run(["ps", "-o", "user=,args=", "-p", str(pid)]).stdout
    assert owner.startswith("sdserve ")
    assert "/opt/sdserve/bin/python3 /usr/bin/sdserve run" in owner
    # the demo's /block (which stalls the event loop) is not served
    block = box.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:8080/block"]
    )
    assert block.stdout == "404"

    # the static user of sysusers.d, the folder of tmpfiles.d
    passwd = box.run(["getent", "passwd", "sdserve"]).stdout.strip().split(":")
    assert passwd[0] == "sdserve"
    assert int(passwd[2]) < 1000  # a system user
    assert passwd[6] == "/usr/sbin/nologin"
    assert box.run(["stat", "-c", "%a %U", "/run/sdserve"]).stdout.split() == ["755", "root"]

    # reload (the zero-gap SIGHUP path) works with the packaged units
    box.systemctl("reload", SERVICE)
    assert main_pid(box) == pid
    assert curl(box).stdout.startswith("hello from sdserve demo")


def test_deb_checks_reach_postgres_and_redis(
    services_box: Box, flavour: str, packages: Packages, record: Record
) -> None:
    """The package's own PostgreSQL and Redis checks (asyncpg, redis-py) pass against the
    machine's servers, from `sdserve check` and in the running service."""
    box = services_box
    forget_testbed_command(box)
    install(box, packages.deb)
    box.write(CONFFILE, CHECKS_CONFIG)
    checks = assert_checks_pass(box)
    record("deb: sdserve check", ", ".join(f"{n} {c['output']}" for n, c in checks.items()))
    box.systemctl("enable", "--now", SOCKET)
    assert_service_ready_with_checks(box)


@pytest.mark.slow
def test_upgrade_under_load_loses_nothing(
    box: Box, flavour: str, packages: Packages, record: Record
) -> None:
    forget_testbed_command(box)
    install(box, packages.deb)
    configure(box)
    assert curl(box).returncode == 0
    box.systemctl("start", SERVICE)  # joins the start job: returns once READY=1 came
    old_pid = main_pid(box)
    sock_before = box.show(SOCKET, "InvocationID", "ActiveEnterTimestampMonotonic")
    # an operator's edit of the conffile must survive the upgrade
    box.run(["sh", "-c", f"echo '# edited by the operator' >> {CONFFILE}"])
    upload(box, packages.deb_next, "/root/next.deb")
    cursor = box.cursor()

    with box.load(keepalive=4, fresh=4, max_seconds=300) as load:
        started = time.monotonic()
        res = dpkg(box, "-i", "/root/next.deb")
        upgrade_s = time.monotonic() - started
        # the new processes serve the load before it ends
        after = curl(box)
        result = load.finish()

    version = box.run(["dpkg-query", "-W", "-f=${Version}", "sdserve"]).stdout
    record(
        "deb upgrade under load",
        f"{result.summary()}; dpkg -i of the newer build took {upgrade_s:.1f} s",
    )
    assert "Unpacking sdserve (" in res.stdout, res.stdout
    assert f"over ({packages.deb.name.split('_')[1]})" in res.stdout, res.stdout
    assert version.endswith("+b2"), version
    assert after.returncode == 0, after.stderr
    assert result.hung_clients == 0
    assert result.failed == 0, result.summary() + "\n" + "\n".join(result.examples)
    assert result.ok == result.requests > 100
    assert result.by_kind["keepalive"]["requests"] > 0
    assert result.by_kind["fresh"]["requests"] > 0
    # the service was restarted onto the new files; the socket was never touched
    new_pid = main_pid(box)
    assert new_pid not in (0, old_pid)
    assert box.show(SOCKET, "InvocationID", "ActiveEnterTimestampMonotonic") == sock_before
    # the old workers drained what they had accepted, cancelling nothing (dpkg returned
    # after the restart job, so these entries are in the journal already)
    drains = [
        e for e in box.journal(cursor=cursor, unit=SERVICE) if e.get("SDSERVE_PHASE") == "drained"
    ]
    assert drains, "no drain of the old processes in the journal"
    assert all(e.get("SDSERVE_CANCELLED") == "0" for e in drains), [message(e) for e in drains]
    assert "# edited by the operator" in box.run(["cat", CONFFILE]).stdout
    assert not exists(box, CONFFILE + ".dpkg-dist")


def test_upgrade_from_the_demo_default_stops_the_socket(
    box: Box, flavour: str, packages: Packages, previous_deb: Path
) -> None:
    """0.1.0-1 served the demo from an enabled socket. Upgraded with its conffile untouched,
    dpkg installs the new one, which names no application: the socket that 0.1.0-1 enabled
    is stopped and disabled, with a line saying so, instead of starting a failing service
    for every connection. With the operator's own conffile (an `app`), nothing changes."""
    forget_testbed_command(box)
    # the operator's conffile: kept (--force-confold), and the socket keeps serving
    install(box, previous_deb)
    assert curl(box).stdout.startswith("hello from sdserve demo")
    box.run(["sh", "-c", f"echo '# edited by the operator' >> {CONFFILE}"])
    upload(box, packages.deb, "/root/new.deb")
    res = dpkg(box, "--force-confold", "-i", "/root/new.deb")
    assert "sdserve.socket was stopped" not in res.stderr, res.stderr
    assert box.show(SOCKET, "ActiveState", "UnitFileState") == {
        "ActiveState": "active",
        "UnitFileState": "enabled",
    }
    assert curl(box).stdout.startswith("hello from sdserve demo")
    dpkg(box, "--purge", "sdserve")

    # the untouched conffile: replaced, and what 0.1.0-1 enabled is undone
    install(box, previous_deb)
    assert curl(box).stdout.startswith("hello from sdserve demo")
    res = dpkg(box, "-i", "/root/new.deb")
    assert "sdserve.socket was stopped and disabled" in res.stderr, res.stderr
    assert "sdserve: no application configured: set app = " in res.stderr, res.stderr
    assert box.run([PKG_SDSERVE, "config", "-c", CONFFILE]).stdout.startswith('app = ""')
    assert box.show(SOCKET, "ActiveState", "UnitFileState") == {
        "ActiveState": "inactive",
        "UnitFileState": "disabled",
    }
    # stopped, not failed in a restart: the new service never ran without an app
    svc = box.show(SERVICE, "ActiveState", "NRestarts")
    assert svc == {"ActiveState": "inactive", "NRestarts": "0"}, svc
    assert listening(box) == ""
    # and the operator's path from there is the fresh install's
    configure(box)
    assert curl(box).stdout.startswith("hello from sdserve demo")


def test_remove_then_purge_leaves_nothing(box: Box, flavour: str, packages: Packages) -> None:
    forget_testbed_command(box)
    before = snapshot(box)
    checked = [*payload_paths(packages.deb), *LEFTOVERS]
    existed = existing(box, checked)  # shared folders: /etc, /lib/systemd/system...
    assert not existed & set(LEFTOVERS)
    install(box, packages.deb)
    configure(box)  # the operator enabled the socket: purge must remove that link too
    assert curl(box).returncode == 0  # the service runs: remove must stop it
    # the byte code of postinst exists, so its removal is tested too
    assert box.run(["find", "/opt/sdserve", "-name", "*.pyc"]).stdout.count("\n") > 100
    assert exists(box, "/var/lib/dpkg/info/sdserve.list")

    # remove: both units stop, the files go, the conffile and the user stay until purge
    dpkg(box, "--remove", "sdserve")
    assert listening(box) == ""
    assert curl(box).returncode != 0
    for unit in (SOCKET, SERVICE):
        props = box.show(unit, "ActiveState", "LoadState")
        assert props == {"ActiveState": "inactive", "LoadState": "not-found"}, (unit, props)
    assert user_processes(box, "sdserve") == 0
    assert not exists(box, "/opt/sdserve")
    assert not exists(box, "/usr/bin/sdserve")
    assert exists(box, CONFFILE)
    assert box.run(["getent", "passwd", "sdserve"], check=False).returncode == 0
    status = box.run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", "sdserve"]).stdout
    assert status.strip() == "rc"

    uid = box.run(["getent", "passwd", "sdserve"]).stdout.split(":")[2]

    # purge: nothing of the package is left, but the system user and group (Debian does not
    # remove system users: what they own would go to the next user of the uid)
    dpkg(box, "--purge", "sdserve")
    after = snapshot(box)
    box.systemctl("daemon-reload")
    assert box.run(["dpkg-query", "-W", "sdserve"], check=False).returncode != 0
    assert box.run(["getent", "passwd", "sdserve"]).stdout.split(":")[2] == uid
    assert box.run(["getent", "group", "sdserve"], check=False).returncode == 0
    # (list-unit-files exits 1 when nothing matches)
    units = box.systemctl("list-unit-files", "--no-legend", "sdserve*", check=False).stdout
    assert units.strip() == ""
    loaded = box.systemctl("list-units", "--all", "--no-legend", "sdserve*", check=False).stdout
    assert loaded.strip() == ""
    left = existing(box, checked) - existed
    assert left == set(), f"left behind: {sorted(left)}"
    new = sorted(p for p in after - before if not p.startswith(NOISE_PREFIXES))
    print("new paths ignored as noise:", *sorted(after - before - set(new)), sep="\n  ")
    assert new == [], f"left behind by install + purge: {new}"
    # and the runtime state of systemd holds nothing of ours either
    runtime = box.run(["find", "/run/systemd", "-name", "*sdserve*"]).stdout
    assert runtime.strip() == ""

    # a reinstall finds the user of the first install and serves as it again
    install(box, packages.deb)
    assert box.run(["getent", "passwd", "sdserve"]).stdout.split(":")[2] == uid
    configure(box)
    assert curl(box).returncode == 0
    box.systemctl("start", SERVICE)
    owner = box.run(["ps", "-o", "user=", "-p", str(main_pid(box))]).stdout.strip()
    assert owner == "sdserve"


@pytest.mark.parametrize("flavour", ["252"])
def test_example_app_package_runs_as_an_instance(
    box: Box, flavour: str, packages: Packages
) -> None:
    """packaging/example: a user's application packaged on top of sdserve (sdserve@hello),
    with its own user; sdserve itself, not configured, serves nothing meanwhile."""
    forget_testbed_command(box)
    install(box, packages.deb)
    install(box, packages.example)
    instance_socket, instance = "sdserve@hello.socket", "sdserve@hello.service"
    assert box.show(instance_socket, "ActiveState", "UnitFileState") == {
        "ActiveState": "active",
        "UnitFileState": "enabled",
    }
    assert 'users:(("systemd",pid=1,' in listening(box, 8090)
    res = curl(box, "http://127.0.0.1:8090/")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "hello from sdserve-hello\n"
    box.systemctl("start", instance)  # joins the start job the socket queued
    props = box.show(instance, "ActiveState", "User", "DropInPaths", "MainPID")
    assert props["ActiveState"] == "active"
    assert props["User"] == "sdserve-hello"
    dropins = [path.split("/")[-2:] for path in props["DropInPaths"].split()]
    assert dropins == [["sdserve@hello.service.d", "50-app.conf"]], props["DropInPaths"]
    owner = box.run(["ps", "-o", "user:32=", "-p", props["MainPID"]]).stdout.strip()
    assert owner == "sdserve-hello"
    # sdserve's own units are untouched by the instance (and, not configured, serve nothing)
    assert box.show(SERVICE, "ActiveState")["ActiveState"] == "inactive"
    assert box.show(SOCKET, "ActiveState")["ActiveState"] == "inactive"
    assert listening(box) == ""

    dpkg(box, "--purge", "sdserve-hello")
    assert listening(box, 8090) == ""
    assert box.show(instance, "ActiveState")["ActiveState"] == "inactive"
    assert box.show(instance_socket, "UnitFileState")["UnitFileState"] == "disabled"
    gone = ["/etc/sdserve/hello.toml", "/usr/lib/sdserve-hello"]
    gone.append("/etc/systemd/system/sockets.target.wants/sdserve@hello.socket")
    assert existing(box, gone) == set()
    # the instance's system user stays, as sdserve's does
    assert box.run(["getent", "passwd", "sdserve-hello"], check=False).returncode == 0
    # sdserve itself still works once configured
    configure(box)
    assert curl(box).stdout.startswith("hello from sdserve demo")


def test_the_web_servers_group_reaches_a_template_instance(
    box: Box, flavour: str, packages: Packages
) -> None:
    """An sdserve@ instance's unix socket: root:www-data 0660 (the package's drop-in), so
    Debian's web servers, as reverse proxies, may connect; other users get EACCES."""
    forget_testbed_command(box)
    install(box, packages.deb)
    box.write("/etc/sdserve/demo.toml", DEMO_CONFIG)
    box.systemctl("start", "sdserve@demo.socket")
    path = "/run/sdserve/demo.sock"
    assert box.run(["stat", "-c", "%U:%G %a", path]).stdout.strip() == "root:www-data 660"

    def get(user: str) -> subprocess.CompletedProcess[str]:
        argv = ["runuser", "-u", user, "--", "curl", "-sS", "--max-time", "30"]
        return box.run([*argv, "--unix-socket", path, "http://localhost/"], check=False)

    proxy = get("www-data")
    assert proxy.returncode == 0, proxy.stderr
    assert proxy.stdout.startswith("hello from sdserve demo"), proxy.stdout
    connect = f"import socket; socket.socket(socket.AF_UNIX).connect({path!r})"
    other = box.run(["runuser", "-u", "nobody", "--", "python3", "-c", connect], check=False)
    assert other.returncode == 1, (other.stdout, other.stderr)
    assert "PermissionError: [Errno 13] Permission denied" in other.stderr, other.stderr
    box.systemctl("stop", "sdserve@demo.socket", "sdserve@demo.service")


# ---- the rpm ---------------------------------------------------------------------------------


def rpm_query(rpm: Path, *args: str) -> str:
    return subprocess.run(
        ["rpm", "-qp", "--nosignature", *args, str(rpm)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout


@pytest.fixture
def rpm_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="sds-rpmroot-"))
    try:
        yield root
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=True)


@pytest.mark.parametrize("flavour", ["254"])
def test_rpm_payload_and_scriptlets(
    services_box: Box, flavour: str, packages: Packages, rpm_root: Path, record: Record
) -> None:
    box = services_box
    rpm = packages.rpm
    scripts = rpm_query(rpm, "--scripts")
    files = rpm_query(rpm, "--qf", r"[%{FILEFLAGS:fflags} %{FILEMODES:perms} %{FILENAMES}\n]")
    print(f"--- rpm -qp --scripts {rpm.name}\n{scripts}")
    print(f"--- rpm -qpl {rpm.name} (without the venv's files)")
    print("\n".join(line for line in files.splitlines() if "/opt/sdserve/lib/" not in line))
    record("rpm size", f"{rpm.stat().st_size / 1e6:.1f} MB, {files.count(chr(10))} files")

    listed = {line.split(" ")[-1]: line.split(" ")[0] for line in files.splitlines()}
    assert listed["/etc/sdserve/sdserve.toml"] == "cn"  # %config(noreplace)
    for path in (
        "/usr/bin/sdserve",
        "/opt/sdserve/bin/sdserve",
        "/usr/lib/systemd/system/sdserve.socket",
        "/usr/lib/systemd/system/sdserve.service",
        "/usr/lib/systemd/system/sdserve.service.d/40-package.conf",
        "/usr/lib/systemd/system/sdserve@.service",
        "/usr/lib/systemd/system/sdserve@.socket",
        "/usr/lib/systemd/system-preset/50-sdserve.preset",
        "/usr/lib/sysusers.d/sdserve.conf",
        "/usr/lib/tmpfiles.d/sdserve.conf",
        # the postgres and redis extras, for the built-in checks
        "/opt/sdserve/lib/python3.11/site-packages/asyncpg/__init__.py",
        "/opt/sdserve/lib/python3.11/site-packages/redis/asyncio/__init__.py",
        # the loop it serves on (loop = "auto")
        "/opt/sdserve/lib/python3.11/site-packages/uvloop/__init__.py",
    ):
        assert path in listed, path
    # the template's instances are not made to share the user sdserve
    assert not [p for p in listed if p.startswith("/usr/lib/systemd/system/sdserve@.service.d")]
    requires = rpm_query(rpm, "--requires")
    assert "python(abi) = 3.11" in requires
    assert "libsystemd.so.0()(64bit)" in requires

    # every scriptlet is valid sh
    parts = {}
    for tag in ("POSTIN", "PREUN", "POSTUN"):
        body = rpm_query(rpm, "--qf", f"%{{{tag}}}")
        assert body.strip() not in ("", "(none)"), tag
        subprocess.run(["sh", "-n"], input=body, text=True, check=True, timeout=10)
        parts[tag] = body
    assert "preset sdserve.socket" in parts["POSTIN"]
    assert "try-restart sdserve.service" in parts["POSTUN"]
    assert "disable --now sdserve.socket" in parts["PREUN"]

    # the payload: into an empty rpm root (no rpm-based distribution here, so without
    # dependencies and scriptlets), verified, then erased again
    def rpm_in_root(*args: str) -> str:
        return subprocess.run(
            ["rpm", "--root", str(rpm_root), "--nosignature", *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout

    rpm_in_root("--initdb")
    rpm_in_root("-i", "--nodeps", "--noscripts", str(rpm))
    assert rpm_in_root("-q", "sdserve").startswith("sdserve-")
    # rpm -V: sizes, digests, modes of every file as installed (symlinks to / are dangling in
    # the scratch root, so only real files are compared)
    verify = subprocess.run(
        ["rpm", "--root", str(rpm_root), "-V", "--nolinkto", "--nodeps", "sdserve"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert verify.stdout.strip() == "", verify.stdout
    payload = rpm_root / "payload.tar"
    subprocess.run(
        ["tar", "-C", str(rpm_root), "-cf", str(payload), "etc", "opt", "usr"],
        check=True,
        timeout=120,
    )

    # the scriptlets against a real systemd: the payload goes into the box, then the
    # scriptlets run as rpm runs them ($1 = number of instances after the operation)
    box.run(["rm", "-f", "/usr/bin/sdserve"])
    upload(box, payload, "/root/payload.tar")
    box.run(["tar", "-C", "/", "--keep-directory-symlink", "-xf", "/root/payload.tar"])
    for tag, body in parts.items():
        box.write(f"/root/{tag.lower()}.sh", body)

    def scriptlet(tag: str, arg: int) -> None:
        box.run(["sh", f"/root/{tag.lower()}.sh", str(arg)], timeout=120)

    # install: %post 1 makes the user and applies the presets, which enable nothing
    scriptlet("POSTIN", 1)
    for unit in (SOCKET, SERVICE):
        props = box.show(unit, "ActiveState", "UnitFileState")
        assert props == {"ActiveState": "inactive", "UnitFileState": "disabled"}, (unit, props)
    assert listening(box) == ""
    assert box.run(["getent", "passwd", "sdserve"], check=False).returncode == 0
    # the operator configures an app with both built-in checks: they pass from the payload's
    # sdserve, and the service that the socket starts is ready with them
    box.write(CONFFILE, CHECKS_CONFIG)
    checks = assert_checks_pass(box)
    record("rpm: sdserve check", ", ".join(f"{n} {c['output']}" for n, c in checks.items()))
    box.systemctl("enable", "--now", SOCKET)
    res = curl(box)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("hello from sdserve demo")
    assert_service_ready_with_checks(box)
    old_pid = main_pid(box)
    sock_before = box.show(SOCKET, "InvocationID")

    # upgrade: new %post 2, old %preun 1, old %postun 1 (try-restart), under load
    with box.load(keepalive=4, fresh=4, max_seconds=120) as load:
        scriptlet("POSTIN", 2)
        scriptlet("PREUN", 1)
        scriptlet("POSTUN", 1)
        assert curl(box).returncode == 0
        result = load.finish()
    record("rpm upgrade scriptlets under load", result.summary())
    assert result.failed == 0, result.summary() + "\n" + "\n".join(result.examples)
    assert result.ok == result.requests > 50
    assert main_pid(box) not in (0, old_pid)
    assert box.show(SOCKET, "InvocationID") == sock_before

    # erase: %preun 0 stops and disables both
    scriptlet("PREUN", 0)
    scriptlet("POSTUN", 0)
    assert listening(box) == ""
    for unit in (SOCKET, SERVICE):
        props = box.show(unit, "ActiveState", "UnitFileState")
        assert props == {"ActiveState": "inactive", "UnitFileState": "disabled"}, (unit, props)

    # erasing the payload from the scratch root leaves no file of the package there
    rpm_in_root("-e", "--nodeps", "--noscripts", "sdserve")
    payload.unlink()
    leftover = [
        str(p.relative_to(rpm_root))
        for p in rpm_root.rglob("*")
        if "sdserve" in p.name and not str(p.relative_to(rpm_root)).startswith("var/lib/rpm")
    ]
    assert leftover == []
