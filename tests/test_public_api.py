"""The public API is what ``sdserve.__all__`` says, and all of it exists."""

from __future__ import annotations

import sdserve


def test_all_is_sorted_and_complete() -> None:
    assert sdserve.__all__ == sorted(sdserve.__all__)
    for name in sdserve.__all__:
        assert hasattr(sdserve, name), name


def test_exceptions_are_exceptions() -> None:
    for name in ("ActivationError", "AppLoadError", "BindError", "ConfigError", "StartupFailed"):
        assert issubclass(getattr(sdserve, name), Exception)
    assert sdserve.ExitCode.DRAIN_TIMEOUT == 4
