"""A real Prometheus (Debian's ``prometheus``) for the tests: on loopback, in a directory of
the test's, scraping sdserve's admin socket every :data:`SCRAPE` seconds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

SCRAPE = 0.25
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")

needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="Debian's prometheus is not installed (make apt)"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Prometheus:
    def __init__(self, port: int) -> None:
        self.port = port

    def api(self, path: str, **params: str | float) -> Any:
        query = urllib.parse.urlencode(params)
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{query}"
        with urllib.request.urlopen(url, timeout=10) as answer:
            body = json.loads(answer.read())
        assert body["status"] == "success", body
        return body["data"]

    async def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, str | float] = {"query": expr}
        if at is not None:
            params["time"] = at
        data = await asyncio.to_thread(self.api, "query", **params)
        return list(data["result"])

    async def scalar(self, expr: str, at: float | None = None) -> float:
        result = await self.query(expr, at)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    async def samples(self, selector: str, seconds: float) -> list[tuple[float, float]]:
        """The raw samples of the one series ``selector`` names, over the last ``seconds``."""
        result = await self.query(f"{selector}[{int(seconds) + 1}s]")
        assert len(result) == 1, (selector, result)
        return [(float(t), float(v)) for t, v in result[0]["values"]]

    async def scraped_after(self, selector: str, when: float, timeout: float) -> float:
        """Wait until a sample of ``selector`` taken after ``when`` (wall clock) is stored;
        its timestamp. Prometheus has no event to wait on: asked once a scrape interval,
        bounded by ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            result = await self.query(f"timestamp({selector})")
            stamps = [float(r["value"][1]) for r in result]
            if stamps and min(stamps) > when:
                return max(stamps)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no sample of {selector} after {when} in {timeout}s")
            await asyncio.sleep(SCRAPE)  # one scrape interval: the next sample


@contextlib.asynccontextmanager
async def prometheus(directory: Path, target: str) -> AsyncIterator[Prometheus]:
    """Prometheus scraping ``target`` (HOST:PORT, /metrics), until the block ends."""
    assert PROMETHEUS is not None
    config = directory / "prometheus.yml"
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread(
        config.write_text,
        "global:\n"
        f"  scrape_interval: {int(SCRAPE * 1000)}ms\n"
        f"  scrape_timeout: {int(SCRAPE * 1000)}ms\n"
        "scrape_configs:\n"
        "  - job_name: sdserve\n"
        f"    static_configs: [{{targets: ['{target}']}}]\n",
    )
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        PROMETHEUS,
        f"--config.file={config}",
        f"--storage.tsdb.path={directory / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=info",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=directory,
    )
    assert proc.stderr is not None
    seen: list[str] = []
    drain: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(30):
            while True:
                line = (await proc.stderr.readline()).decode()
                if not line:
                    raise RuntimeError("prometheus exited:\n" + "".join(seen))
                seen.append(line)
                if "Server is ready to receive web requests" in line:
                    break
        drain = asyncio.create_task(_discard(proc.stderr))
        yield Prometheus(port)
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 30)
        if drain is not None:
            drain.cancel()


async def _discard(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass
