"""Fixtures for the system tests: boxes with a real systemd, parametrized over systemd 252 and 254.

Where boxes cannot run (not root, no systemd-nspawn...), the tests are skipped with the
reason; with ``SDS_TEST_REQUIRE_SYSTEM=1`` (set by ``.ci/run``) they fail instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from . import rootfs
from .testbed import CHECKOUT, Box, missing_prerequisites

REQUIRE_ENV = "SDS_TEST_REQUIRE_SYSTEM"
HERE = Path(__file__).resolve().parent


def _is_system(item: pytest.Item) -> bool:
    return Path(str(item.fspath)).resolve().is_relative_to(HERE)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _is_system(item):
            item.add_marker(pytest.mark.system)


_BUILD_ERROR = pytest.StashKey[str]()


def _unavailable() -> str | None:
    reasons = missing_prerequisites()
    return "; ".join(reasons) if reasons else None


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the rootfs before the first test, outside any test's timeout (``make test``
    has normally built it already; then this is a check of two stamp files)."""
    if session.config.option.collectonly or not any(_is_system(i) for i in session.items):
        return
    if _unavailable() is None and not all(rootfs.is_current(f) for f in rootfs.FLAVOURS):
        started = time.monotonic()
        try:
            rootfs.ensure()
        except Exception as exc:  # reported by every system test, not as a crash of pytest
            session.config.stash[_BUILD_ERROR] = f"building the rootfs failed: {exc!r}"
            return
        rootfs.log(f"rootfs ready in {time.monotonic() - started:.0f} s")


@pytest.fixture(scope="session")
def testbed(pytestconfig: pytest.Config) -> None:
    """Skip (or, under SDS_TEST_REQUIRE_SYSTEM=1, fail) where nspawn boxes cannot run."""
    if _BUILD_ERROR in pytestconfig.stash:
        pytest.fail(pytestconfig.stash[_BUILD_ERROR], pytrace=False)
    reason = _unavailable()
    if reason is None:
        return
    message = f"systemd-nspawn boxes cannot run here: {reason}"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{message} ({REQUIRE_ENV}=1 makes this a failure)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(params=rootfs.FLAVOURS, ids=lambda f: f"systemd{f}")
def flavour(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def box(testbed: None, flavour: str) -> Iterator[Box]:
    """A freshly booted box; everything written in it is gone after the test."""
    workdir = Path(tempfile.mkdtemp(prefix="sds-box-"))
    b = Box.boot(flavour, workdir=workdir)
    _BOOTS.setdefault(flavour, []).append(b.boot_seconds)
    try:
        yield b
    finally:
        b.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def shipped_units() -> dict[str, str]:
    """The repository's units/ (the same on every systemd version)."""
    files = {}
    for path in sorted((CHECKOUT / "units").rglob("*")):
        if not path.is_file() or path.suffix not in {".socket", ".service", ".conf"}:
            continue
        files[str(path.relative_to(CHECKOUT / "units"))] = path.read_text()
    return files


# ---- figures the system tests measure, printed at the end of the run -----------------------
_FIGURES: dict[str, str] = {}
_BOOTS: dict[str, list[float]] = {}


def put_figure(flavour: str, name: str, value: str) -> None:
    """Record a measured figure for the summary (for fixtures wider than a test)."""
    _FIGURES[f"systemd {flavour}: {name}"] = value


@pytest.fixture
def record(flavour: str) -> Callable[[str, str], None]:
    """Record a measured figure (exposure, boot time, load totals) for the summary."""

    def put(name: str, value: str) -> None:
        put_figure(flavour, name, value)

    return put


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for flavour, times in _BOOTS.items():
        boots = sorted(times)
        _FIGURES[f"systemd {flavour}: box boot to 'running'"] = (
            f"median {boots[len(boots) // 2]:.2f} s, max {boots[-1]:.2f} s over {len(boots)} boots"
        )
    if not _FIGURES:
        return
    terminalreporter.section("system test figures")
    for name in sorted(_FIGURES):
        terminalreporter.write_line(f"{name}: {_FIGURES[name]}")
