"""Long-lived WebSocket clients: every handshake and echo counted, clean closes apart."""

from __future__ import annotations

import pytest

from sdserve.drill import DrillSpec, run_drill
from tests.drill.servers import FaultyServer


@pytest.mark.asyncio
async def test_websocket_counts_equal_server_records() -> None:
    server = FaultyServer.start("--every", "3", module="tests.drill.wsserver")
    try:
        spec = DrillSpec(
            targets=(),
            duration=1.5,
            ws_url=f"ws://127.0.0.1:{server.port}/ws",
            ws_clients=4,
            ws_interval=0.05,
            processes=2,
        )
        result = await run_drill(spec)
    finally:
        records = server.stop()
    counts = result.counts()
    assert counts["failures"] == 0
    assert records["echoes"] > 3 * 4
    assert result.requests == records["handshakes"] + records["echoes"]
    assert result.ws_sessions == records["handshakes"]
    # the server closed a session after every third echo; the drill saw each close
    # as clean (a close frame) and opened a new session at its next turn
    assert result.ws_clean_closes == records["closes"]
    assert result.ws_abnormal_closes == 0
    assert int(result.reused.sum()) == records["echoes"]
    (ws,) = result.per_target()
    assert ws["url"].startswith("ws://")
    assert ws["requests"] == result.requests
