"""The HTML report renders its plots in a real browser (headless Chromium), offline."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from sdserve.drill import Action, DrillSpec, Schedule, Target, command, run_drill
from sdserve.drill.html import render_html
from tests.drill.servers import FaultyServer

StartServer = Callable[..., FaultyServer]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / "profile"
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def report(faulty: StartServer, tmp_path: Path) -> Path:
    server = faulty("toggle", "--code", "503")
    outage = Action(
        "outage",
        command(f"kill -USR1 {server.proc.pid}"),
        Schedule(times=2, every=1.0, start=0.5),
        end=command(f"kill -USR2 {server.proc.pid}"),
        hold=0.3,
    )
    spec = DrillSpec(targets=(Target(server.url),), duration=2.5, rate=300, processes=1)
    result = asyncio.run(run_drill(spec, [outage]))
    server.stop()
    path = tmp_path / "report.html"
    path.write_text(render_html(result.to_json()))
    return path


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian package chromium not installed")
def test_report_renders_plots_in_chromium(report: Path, tmp_path: Path) -> None:
    text = report.read_text()
    # self-contained: nothing is fetched from anywhere
    assert not re.search(r"""(src|href)=["'](https?:)?//""", text)

    dom = chromium(tmp_path, "--dump-dom", report.as_uri())
    assert dom.returncode == 0, dom.stderr
    images = re.findall(
        r'<img class="plot" id="plot-(\w+)"[^>]*src="data:image/png;base64,([^"]+)"', dom.stdout
    )
    assert [name for name, _ in images] == ["throughput", "latency", "phases"]
    for _, data in images:
        pixels = mpimg.imread(io.BytesIO(base64.b64decode(data)), format="png")
        assert pixels.shape[0] > 200
        assert pixels.shape[1] > 600

    shot = tmp_path / "shot.png"
    run = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1400", report.as_uri())
    assert run.returncode == 0, run.stderr
    pixels = mpimg.imread(shot)[:, :, :3]
    assert pixels.shape[:2] == (1400, 1200)
    non_white = np.any(pixels < 0.95, axis=2)
    assert non_white.mean() > 0.05  # not a blank page
    # the success line of the throughput plot (#2ca02c) is on screen
    green = np.all(np.abs(pixels - np.array([0x2C, 0xA0, 0x2C]) / 255) < 0.06, axis=2)
    assert green.sum() > 200
    # so is a failure bar (503s, #ff7f0e)
    orange = np.all(np.abs(pixels - np.array([0xFF, 0x7F, 0x0E]) / 255) < 0.06, axis=2)
    assert orange.sum() > 50
