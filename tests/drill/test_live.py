"""The live progress display shows the running counts by class."""

from __future__ import annotations

import io

from rich.console import Console

from sdserve.drill.live import LiveProgress
from sdserve.drill.outcome import RESET
from sdserve.drill.runner import Progress


def test_live_progress_renders_counts() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200, color_system=None)
    with LiveProgress(console) as live:
        live.update(
            Progress(
                elapsed=2.0,
                duration=10.0,
                counts={200: 1234, 503: 5, RESET: 7},
                inflight=16,
                actions_done=1,
                actions_total=4,
                last_action="restart #1 ok",
            )
        )
    text = out.getvalue()
    assert "1,246" in text  # all requests
    assert "1,234" in text  # success
    assert "623" in text  # requests per second
    assert "1/4" in text
    assert "restart #1 ok" in text
