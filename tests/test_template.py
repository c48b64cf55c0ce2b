"""The warm template (sdserve.template): reloads fork their workers from a process that has
imported the libraries; the supervisor adopts them; a library changed on disk makes it
start workers by fork and exec again, and a new template."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from sdserve.launcher import Launcher
from sdserve.template import is_template
from tests.conftest import LauncherFactory, MakeSupervised
from tests.helpers import children, get, load, read_response, versions, write_app

pytestmark = pytest.mark.asyncio
HOST = "127.0.0.1"
ORPHANS_APP = "tests.apps.orphans:create_app"
#: reloads, at most, before the template has imported everything and forks the new workers
#: (the first reload may come before it is ready: its workers are then exec'd)
RELOADS = 5


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def templates(supervisor: int) -> list[int]:
    text = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text()
    return [pid for pid in map(int, text.split()) if is_template(pid)]


def all_children(pid: int) -> set[int]:
    """``pid``'s children, its template too."""
    return set(map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split()))


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def forked(pid: int) -> bool:
    """A worker forked from the template keeps the template's command line."""
    return cmdline(pid)[-2:] == ["sdserve", "template"]


async def reload_until_forked(launcher: Launcher, supervisor: int, appdir: Path) -> int:
    """Reload a one-worker service (new code each time) until its new worker is forked
    from the template, i.e. the template is ready; that worker."""
    for i in range(2, 2 + RELOADS):
        before = set(children(supervisor))
        write_app(appdir, f"v{i}")
        await launcher.reload(timeout=60)
        (worker,) = set(children(supervisor)) - before - set(templates(supervisor))
        if forked(worker):
            return worker
    raise AssertionError(f"no worker forked from the template in {RELOADS} reloads")


async def test_reloads_fork_workers_that_the_supervisor_adopts_and_lose_nothing(
    supervised: MakeSupervised, port: int, tmp_path: Path
) -> None:
    launcher = supervised("--warm-template", workers=2)
    supervisor = await launcher.start()
    (template,) = templates(supervisor.pid)
    assert not any(forked(w) for w in children(supervisor.pid))  # the first ones exec
    new: list[int] = []
    async with load(HOST, port, keepalive=4, newconn=4) as stats:
        for i in range(2, 2 + RELOADS):
            before = set(children(supervisor.pid))
            write_app(tmp_path / "app", f"v{i}")
            await launcher.reload(timeout=60)
            assert await versions(port, 5) == {f"v{i}"}  # the new code, imported afresh
            new = sorted(set(children(supervisor.pid)) - before)
            if len(new) == 2 and all(forked(w) for w in new):
                break
        await stats.wait_ok(stats.total_ok + 50, timeout=30)
    assert len(new) == 2
    assert all(forked(w) for w in new), [cmdline(w) for w in new]
    # adopted: the supervisor is their parent, and no worker is named as the template
    assert {parent(w) for w in new} == {supervisor.pid}
    assert templates(supervisor.pid) == [template]
    assert not stats.failed, dict(stats.failed)
    # a forked worker killed: its exit status is the supervisor's to collect, as a child's
    mark = len(launcher.sink.messages)
    os.kill(new[0], signal.SIGKILL)
    await launcher.wait_for(
        supervisor,
        lambda m: "2/2 workers ready" in m.fields.get("STATUS", ""),
        timeout=30,
        start=mark,
    )
    assert await launcher.stop() == 0
    killed = [line for line in supervisor.log_text().splitlines() if f"(pid {new[0]}," in line]
    assert any("SIGKILL" in line for line in killed), killed
    assert not alive(template)  # ended with the supervisor, and collected


async def test_a_library_changed_on_disk_means_exec_and_a_new_template(
    supervised: MakeSupervised, port: int, tmp_path: Path
) -> None:
    # a module every Python process here imports at start, the template too
    site = tmp_path / "site"
    site.mkdir()
    custom = site / "sitecustomize.py"
    custom.write_text("# imported by every interpreter of this test\n")
    launcher = supervised("--warm-template", workers=1, env={"PYTHONPATH": str(site)})
    supervisor = await launcher.start()
    (first,) = templates(supervisor.pid)
    await reload_until_forked(launcher, supervisor.pid, tmp_path / "app")
    # an upgrade: the file the template imported is not the one on disk any more
    custom.write_text("# a new release of a library\n")
    before = set(children(supervisor.pid))
    await launcher.reload(timeout=60)
    (second,) = templates(supervisor.pid)
    assert second != first
    (worker,) = set(children(supervisor.pid)) - before - {second}
    assert cmdline(worker)[-2:] == ["worker", "relapp:create_app"]  # exec'd: new libraries
    assert not alive(first)  # the stale one is gone, and collected
    for _ in range(RELOADS):  # and the new template forks the next ones
        before = set(children(supervisor.pid))
        await launcher.reload(timeout=60)
        (worker,) = set(children(supervisor.pid)) - before
        if forked(worker):
            break
    assert forked(worker)
    assert await launcher.stop() == 0
    assert "changed on disk" in supervisor.log_text()


async def test_the_template_is_named_apart_from_the_workers(
    supervised: MakeSupervised, port: int
) -> None:
    launcher = supervised("--warm-template", workers=1)
    supervisor = await launcher.start()
    (template,) = templates(supervisor.pid)
    assert cmdline(template)[-2:] == ["sdserve", "template"]
    assert is_template(template)  # by its name, NAME
    # tests and the drill find the workers among the supervisor's children without it
    (worker,) = children(supervisor.pid)
    assert worker != template
    assert await launcher.stop() == 0
    assert not alive(template)  # it ends with the supervisor


async def test_a_template_that_does_not_answer_is_replaced_and_the_reload_execs(
    supervised: MakeSupervised, port: int, tmp_path: Path
) -> None:
    launcher = supervised("--warm-template", workers=1)
    supervisor = await launcher.start()
    (stuck,) = templates(supervisor.pid)
    await reload_until_forked(launcher, supervisor.pid, tmp_path / "app")  # it is ready
    os.kill(stuck, signal.SIGSTOP)  # it takes the next request, and never answers
    async with load(HOST, port, keepalive=4, newconn=4) as stats:
        before = all_children(supervisor.pid)
        write_app(tmp_path / "app", "v9")
        await launcher.reload(timeout=60)
        assert await versions(port, 5) == {"v9"}
        new = all_children(supervisor.pid) - before
        await stats.wait_ok(stats.total_ok + 50, timeout=30)
    assert not stats.failed, dict(stats.failed)
    # the worker is exec'd after the template's silence, and a new template started
    assert len(new) == 2, [cmdline(w) for w in new]
    (execd,) = (w for w in new if cmdline(w)[-2:] == ["worker", "relapp:create_app"])
    (fresh,) = new - {execd}
    assert cmdline(fresh)[-2:] == ["sdserve", "template"]
    assert not alive(stuck)  # killed at once, and collected
    assert await launcher.stop() == 0
    assert "it did not start a worker" in supervisor.log_text()


async def test_a_ready_process_the_supervisor_did_not_start_is_stopped(
    make_launcher: LauncherFactory, port: int
) -> None:
    """As a worker a failed template started after all would: an orphan of a worker,
    adopted by the supervisor, that says READY=1 on its channel is told to stop."""
    launcher = make_launcher("--workers", "1", "--warm-template", app=ORPHANS_APP)
    supervisor = await launcher.start()
    (worker,) = children(supervisor.pid)
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(b"POST /stray HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
        response = await asyncio.wait_for(read_response(reader), 30)
    finally:
        writer.close()
    stray = int(response.body)
    gone = os.pidfd_open(stray)
    try:
        loop = asyncio.get_running_loop()
        ended = loop.create_future()

        def readable() -> None:
            if not ended.done():
                ended.set_result(None)

        loop.add_reader(gone, readable)
        try:
            await asyncio.wait_for(ended, 30)  # it said READY=1, and was stopped
        finally:
            loop.remove_reader(gone)
    finally:
        os.close(gone)
    assert alive(worker)  # and the worker serves on
    assert (await get(HOST, port, "/")).status == 200
    assert await launcher.stop() == 0
    log = supervisor.log_text()
    assert f"process {stray} says it is a ready worker" in log
