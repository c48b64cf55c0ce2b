"""sdserve as PID 1 of a podman container, without systemd (issue 17).

The image is built here, from the test bed's debootstrapped systemd-252 root (no registry
is reachable): ``podman import`` of the rootfs makes the base image (cached in podman's
storage under ``$SDS_TEST_CACHE/podman``, keyed by the rootfs's key), and a build on top
copies in the ``sdserve/`` package under test (``$SDS_TEST_SOURCE`` or the checkout's, where
the rootfs's venv looks for it) and the orphan-making app. The container runs ``sdserve run``
as its entrypoint, so as PID 1, on the host's network: it binds its own socket on
127.0.0.1 and logs JSON on stdout (every line must parse). Under load, it reaps the orphans
the app leaves, and ``podman stop -t N`` (SIGTERM, SIGKILL after N s) drains it: 0 failed
requests, exit status 0, no zombie left.

Where podman cannot run (not root, not installed, no rootfs...), the test is skipped, or
fails under ``SDS_TEST_REQUIRE_SYSTEM=1``, as the box tests are.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

import pytest

from sdserve.config import Config
from sdserve.units import timeout_stop_sec
from tests.helpers import HOST, get, load
from tests.pid1 import (
    JsonLog,
    free_port,
    inner_pid,
    make_orphans,
    ready,
    reaped,
    stop_seen,
    zombies,
)

from . import rootfs
from .conftest import REQUIRE_ENV
from .testbed import sdserve_source

FLAVOUR = "252"
BASE = "localhost/sds-testbed"
APP_SOURCE = Path(__file__).resolve().parents[1] / "apps" / "orphans.py"
WORKERS = 2
DRAIN_DELAY = 1.0
SHUTDOWN_TIMEOUT = 5.0
CLEANUP_TIMEOUT = 2.0
# podman stop's timeout must exceed everything sdserve does on a stop (its stop budget), by
# the margin of systemd's TimeoutStopSec= and Kubernetes' terminationGracePeriodSeconds
STOP_TIMEOUT = timeout_stop_sec(
    Config(
        drain_delay=DRAIN_DELAY, shutdown_timeout=SHUTDOWN_TIMEOUT, cleanup_timeout=CLEANUP_TIMEOUT
    )
)
ORPHANS = 10

#: podman as it runs on this machine: runc (no crun), cgroupfs (no systemd as PID 1 of the
#: host's container), its storage in the test cache and its run state on /run
PODMAN = (
    "podman",
    "--root",
    str(rootfs.cache_root() / "podman"),
    "--runroot",
    "/run/sds-podman",
    "--runtime",
    "runc",
    "--cgroup-manager",
    "cgroupfs",
)
#: the host's limits are above what an unprivileged container may be given
RUN_FLAGS = (
    "--network",
    "host",
    "--ulimit",
    "nofile=16384:16384",
    "--ulimit",
    "nproc=4096:4096",
)


def podman(
    *args: str, check: bool = True, timeout: float = 120, stdin: IO[bytes] | None = None
) -> str:
    done = subprocess.run(
        [*PODMAN, *args],
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return done.stdout


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    for tool in ("podman", "runc"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (make apt)"
    if not rootfs.is_current(FLAVOUR):
        return f"the test bed's rootfs {rootfs.rootfs_path(FLAVOUR)} is missing or stale"
    return None


def _skip_or_fail(message: str) -> None:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{message} ({REQUIRE_ENV}=1 makes this a failure)", pytrace=False)
    pytest.skip(message)


def _base_image() -> str:
    """The rootfs imported as an image, once per rootfs key (podman keeps it)."""
    tag = f"{BASE}:{rootfs.flavour_key(FLAVOUR)}"
    if subprocess.run([*PODMAN, "image", "exists", tag], check=False).returncode == 0:
        return tag
    root = rootfs.rootfs_path(FLAVOUR)
    started = time.monotonic()
    with rootfs.locked(root.parent, shared=True):  # no rebuild while it is read
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        try:
            podman("import", "-", tag, stdin=tar.stdout, timeout=600)
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait()
    if tar.returncode != 0:
        raise RuntimeError(f"tar of {root} exited {tar.returncode}")
    rootfs.log(f"container base image {tag} imported in {time.monotonic() - started:.0f} s")
    for old in podman("images", "--format", "{{.Repository}}:{{.Tag}}", BASE).split():
        if old != tag:  # an image of a stale rootfs
            podman("rmi", old, check=False)
    return tag


CONTAINERFILE = """\
FROM {base}
COPY sdserve {src}/sdserve
COPY orphans.py /opt/app/orphans.py
WORKDIR /opt/app
ENV SDSERVE_LOG=json
ENTRYPOINT ["{venv}/bin/sdserve", "run"]
CMD ["orphans:create_app"]
"""


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    """An image of the rootfs with the sdserve under test in it; removed after the tests."""
    if (reason := _unavailable()) is not None:
        _skip_or_fail(f"podman containers cannot run here: {reason}")
    try:
        base = _base_image()
        podman("run", "--rm", *RUN_FLAGS, base, "/bin/true")
    except (RuntimeError, subprocess.SubprocessError) as exc:
        _skip_or_fail(f"podman containers cannot run here: {exc}")
    tag = f"localhost/sds-container-test:{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="sds-image-") as context:
        ctx = Path(context)
        shutil.copytree(sdserve_source(), ctx / "sdserve", ignore=shutil.ignore_patterns("*.pyc"))
        shutil.copy(APP_SOURCE, ctx / "orphans.py")
        (ctx / "Containerfile").write_text(
            CONTAINERFILE.format(base=base, src=rootfs.SRC_MOUNT, venv=rootfs.VENV)
        )
        podman("build", "--pull=never", "--quiet", "-t", tag, str(ctx), timeout=300)
    try:
        yield tag
    finally:
        podman("rmi", "--force", tag, check=False)


@contextlib.asynccontextmanager
async def container(image: str, name: str, args: Sequence[str]):  # type: ignore[no-untyped-def]
    """``podman run`` in the foreground (its stdout is the container's); removed after."""
    proc = await asyncio.create_subprocess_exec(
        *PODMAN,
        "run",
        "--name",
        name,
        *RUN_FLAGS,
        image,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    assert proc.stdout is not None
    log = JsonLog(proc.stdout)
    reader = asyncio.create_task(log.read())
    try:
        yield proc, log
    finally:
        if proc.returncode is None:
            podman("kill", name, check=False)
        await asyncio.wait_for(proc.wait(), 60)
        await reader
        podman("rm", "--force", name, check=False)


@pytest.mark.asyncio
async def test_sdserve_as_pid1_in_a_container_reaps_and_drains_on_podman_stop(
    image: str,
) -> None:
    port = free_port()
    name = f"sds-container-{os.getpid()}"
    args = [
        "orphans:create_app",
        f"--bind={HOST}:{port}",
        f"--workers={WORKERS}",
        f"--drain-delay={DRAIN_DELAY}",
        f"--shutdown-timeout={SHUTDOWN_TIMEOUT}",
        f"--cleanup-timeout={CLEANUP_TIMEOUT}",
    ]
    async with container(image, name, args) as (proc, log):
        await log.expect("ready", ready, timeout=120)
        state = json.loads(podman("inspect", name, "--format", "{{json .State}}"))
        init = int(state["Pid"])
        assert inner_pid(init) == 1
        sockets = [line for line in log.lines if line.get("phase") == "sockets"]
        assert sockets[0]["pid"] == 1
        assert f"http={HOST}:{port}" in sockets[0]["message"]
        assert "bound" in sockets[0]["message"]  # its own socket, not one handed in
        async with load(HOST, port, keepalive=4, newconn=4) as stats:
            await stats.wait_ok(300, timeout=120)
            orphans = await make_orphans(port, ORPHANS, status=3)
            lines = await log.expect("the orphans reaped", reaped, count=ORPHANS, timeout=60)
            assert {line["orphan"] for line in lines} == orphans
            assert {line["status"] for line in lines} == {3}
            assert zombies(init) == []
            await stats.wait_ok(stats.total_ok + 300, timeout=120)
            before_stop = stats.total_ok
            started = time.monotonic()
            stop = await asyncio.create_subprocess_exec(
                *PODMAN, "stop", "-t", str(STOP_TIMEOUT), name, stdout=asyncio.subprocess.DEVNULL
            )
            # the load goes on until a load balancer would take the container out
            noticed = await health_check_fails(port, timeout=30)
        await log.expect("the stop", stop_seen, timeout=30)
        assert noticed - started < DRAIN_DELAY + 5  # within drain_delay, on an idle machine
        assert await asyncio.wait_for(stop.wait(), STOP_TIMEOUT + 30) == 0
        stop_seconds = time.monotonic() - started
        exit_code = await asyncio.wait_for(proc.wait(), 30)
        state = json.loads(podman("inspect", name, "--format", "{{json .State}}"))
    assert stats.total_failed == 0, stats.failed
    assert exit_code == 0
    assert state["ExitCode"] == 0, state
    assert not state["OOMKilled"]
    # it drained, it was not killed: the drain lines of each worker, then the supervisor's exit
    drained = [line for line in log.lines if line.get("phase") == "drained"]
    assert len(drained) == WORKERS, drained
    assert log.lines[-1]["pid"] == 1
    assert log.lines[-1]["message"] == "exiting with status 0", log.lines[-1]
    assert stop_seconds < STOP_TIMEOUT  # SIGKILL would have come at STOP_TIMEOUT
    assert not log.bad, f"stdout lines that are not JSON objects: {log.bad[:3]}"
    assert all({"timestamp", "level", "logger", "message", "pid"} <= set(x) for x in log.lines)
    assert (await _refused(port)) is True  # nothing is left listening
    sys.stderr.write(
        f"container: {ORPHANS} orphans reaped, 0 zombies; podman stop -t {STOP_TIMEOUT} took "
        f"{stop_seconds:.2f} s; {stats.total_ok} requests ({stats.total_ok - before_stop} "
        f"during the stop), {stats.total_failed} failed; exit status {state['ExitCode']}\n"
    )


#: how often the load balancer of :func:`health_check_fails` checks ``/readyz`` (seconds)
CHECK_INTERVAL = 0.1


async def health_check_fails(port: int, timeout: float) -> float:
    """A load balancer's health check: ``GET /readyz`` every :data:`CHECK_INTERVAL` until it
    fails (503 during ``drain_delay``, or no answer); returns when it did (monotonic).

    The interval is the load balancer's, the thing modelled (HAProxy's ``inter``); the
    drain rule is that ``drain_delay`` exceeds it (times ``fall``)."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                answer = await get(HOST, port, "/readyz", timeout=CHECK_INTERVAL * 10)
            except (OSError, TimeoutError):
                return time.monotonic()
            if answer.status != 200:
                return time.monotonic()
            await asyncio.sleep(CHECK_INTERVAL)


async def _refused(port: int) -> bool:
    try:
        await get(HOST, port, "/", timeout=5)
    except ConnectionRefusedError:
        return True
    return False
