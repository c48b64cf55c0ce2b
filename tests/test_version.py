"""The version: ``sdserve --version``, in READY's STATUS= and in the first log line."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

import sdserve
from sdserve.exitcodes import ExitCode
from tests.conftest import ROOT, LauncherFactory, MakeSupervised


def test_the_version_is_the_package_s_and_sdserve_version_prints_it() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert sdserve.__version__ == declared
    done = subprocess.run(
        [sys.executable, "-m", "sdserve", "--version"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"sdserve {declared}\n"


@pytest.mark.asyncio
@pytest.mark.parametrize("workers", [0, 2])
async def test_ready_and_the_first_log_line_name_the_version(
    make_launcher: LauncherFactory, supervised: MakeSupervised, workers: int
) -> None:
    launcher = make_launcher() if workers == 0 else supervised(workers=workers)
    instance = await launcher.start()
    ready = next(m for m in launcher.sink.messages if m.has("READY", "1"))
    assert ready.fields["STATUS"].endswith(f"; sdserve {sdserve.__version__}")
    assert await launcher.stop() == ExitCode.OK
    first = instance.log_text().splitlines()[0]
    assert f"sdserve {sdserve.__version__} (Python " in first, first
    assert "SDSERVE_VERSION=" + sdserve.__version__ in first
