"""The public API is what ``sdserve.__all__`` says, and all of it exists."""

from __future__ import annotations

import subprocess
import sys

import pytest

import sdserve


def test_all_is_sorted_and_complete() -> None:
    assert sdserve.__all__ == sorted(sdserve.__all__)
    for name in sdserve.__all__:
        assert hasattr(sdserve, name), name
    assert set(sdserve.__all__) == set(sdserve._EXPORTS)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = sdserve.nope


def test_importing_the_package_is_light() -> None:
    """``python -m sdserve`` can act before aiohttp is imported (worker warm-up priority)."""
    code = "import sys, sdserve; print('aiohttp' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_exceptions_are_exceptions() -> None:
    for name in ("ActivationError", "AppLoadError", "BindError", "ConfigError", "StartupFailed"):
        assert issubclass(getattr(sdserve, name), Exception)
    assert int(sdserve.ExitCode.DRAIN_TIMEOUT) == 4
