"""The start-up gate (:func:`sdserve.checks.wait_until_ready`) against a check that
fails, then hangs until the start deadline cuts its last run short."""

from __future__ import annotations

import asyncio
import time

import pytest

from sdserve.checks import Check, CheckRegistry, StartupFailed, wait_until_ready

pytestmark = pytest.mark.asyncio


class Reporter:
    def __init__(self) -> None:
        self.statuses: list[str] = []

    def status(self, text: str) -> None:
        self.statuses.append(text)

    def extend_timeout(self, seconds: float) -> None:
        pass


async def test_a_retry_cut_short_by_the_deadline_does_not_replace_the_reason() -> None:
    """The CI failure of test_probes' "reported once" test: a worker's last retry began
    a few microseconds before its deadline and "timed out after 2e-05s", which became its
    reason. The reason given is the last one a run found in its own time."""
    calls = 0
    never = asyncio.Event()

    async def db() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionRefusedError(111, "Connection refused")
        await never.wait()  # the database stopped answering: only the deadline ends it

    reg = CheckRegistry()
    reg.add(Check("db", db, timeout=5.0))
    with pytest.raises(StartupFailed) as failed:
        await wait_until_ready(
            reg,
            Reporter(),
            deadline=time.monotonic() + 0.2,
            retry_initial=0.05,
            retry_max=0.05,
        )
    assert calls >= 2  # retried, and the retry was cut by the deadline
    assert "Connection refused" in str(failed.value)
    assert "timed out" not in str(failed.value)


async def test_a_check_timing_out_in_its_own_time_is_the_reason() -> None:
    never = asyncio.Event()

    async def db() -> None:
        await never.wait()

    reg = CheckRegistry()
    reg.add(Check("db", db, timeout=0.05))
    with pytest.raises(StartupFailed) as failed:
        await wait_until_ready(
            reg, Reporter(), deadline=time.monotonic() + 0.3, retry_initial=0.05, retry_max=0.05
        )
    assert "db (timed out after 0.05s)" in str(failed.value)
