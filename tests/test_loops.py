"""The event loop that serves: uvloop by default where it is installed, asyncio on request."""

from __future__ import annotations

import importlib.util

import pytest

from sdserve.config import ConfigError, load_config
from sdserve.exitcodes import ExitCode
from sdserve.loops import resolve
from tests.conftest import LauncherFactory, MakeSupervised

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("uvloop") is None, reason="uvloop is part of the dev install"
)


def test_auto_is_uvloop_where_it_is_installed() -> None:
    assert load_config(environ={}).loop == "auto"
    assert resolve("auto") == "uvloop"
    assert resolve("asyncio") == "asyncio"
    assert load_config(environ={"SDSERVE_LOOP": "asyncio"}).loop == "asyncio"


def test_an_unknown_loop_names_the_key_and_the_choices() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ={}, overrides={"loop": "tokio"})
    assert "loop" in str(caught.value)
    assert "auto, uvloop, asyncio" in str(caught.value)


@pytest.mark.asyncio
@pytest.mark.parametrize(("args", "expected"), [((), "uvloop"), (("--loop", "asyncio"), "asyncio")])
async def test_a_single_process_serves_on_the_loop_chosen(
    make_launcher: LauncherFactory, args: tuple[str, ...], expected: str
) -> None:
    launcher = make_launcher(*args)
    instance = await launcher.start()
    assert await launcher.stop() == ExitCode.OK  # the log is complete once it exited
    ready = [line for line in instance.log_text().splitlines() if "ready after" in line]
    assert len(ready) == 1, ready
    assert f"({expected}) SDSERVE_PHASE=ready" in ready[0], ready


@pytest.mark.asyncio
async def test_workers_serve_on_uvloop_through_a_reload(
    supervised: MakeSupervised,
) -> None:
    launcher = supervised(workers=2)
    instance = await launcher.start()
    await launcher.reload()
    assert await launcher.stop() == ExitCode.OK
    ready = [line for line in instance.log_text().splitlines() if "ready after" in line]
    workers = [line for line in ready if "sdserve.worker[" in line]
    # two workers, then two more after the reload: all on uvloop
    assert len(workers) == 4, ready
    assert all("(uvloop)" in line for line in workers), workers


@pytest.mark.asyncio
@pytest.mark.parametrize("loop", ["auto", "uvloop"])
async def test_a_single_process_that_reaps_orphans_serves_on_asyncio(
    make_launcher: LauncherFactory, loop: str
) -> None:
    """uvloop refuses a SIGCHLD handler, and the reaper needs one."""
    launcher = make_launcher("--reap-orphans", "yes", "--loop", loop)
    instance = await launcher.start()
    assert await launcher.stop() == ExitCode.OK
    log = instance.log_text()
    ready = [line for line in log.splitlines() if "ready after" in line]
    assert len(ready) == 1, log
    assert "(asyncio) SDSERVE_PHASE=ready" in ready[0], ready
    assert ("loop = uvloop: serving on asyncio instead" in log) == (loop == "uvloop"), log
