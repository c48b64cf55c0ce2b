"""Metrics (sdserve.metrics): one service-wide view, continuous through reloads, worker
deaths and recycling, scraped by a real Prometheus; series that do not pile up."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from sdserve import metrics
from sdserve.exitcodes import ExitCode
from sdserve.launcher import Launcher
from tests.helpers import HOST, children, load, read_response, request_bytes, write_app
from tests.prom import needs_prometheus, prometheus

# -- the files: written in place, folded in when a process is gone ----------------------


def _value(text: str, series: str) -> float:
    found = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    assert found is not None, f"{series} not in:\n{text}"
    return float(found.group(1))


def _series(text: str) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def test_a_dead_process_counts_go_on_in_the_aggregate(tmp_path: Path) -> None:
    environ: dict[str, str] = {"RUNTIME_DIRECTORY": str(tmp_path)}
    path = metrics.setup_directory(environ)
    assert environ[metrics.ENV_DIR] == str(path)
    assert path.parent == tmp_path
    key = metrics._key("sdserve_requests", "sdserve_requests_total", {"code": "2xx"}, "h")
    for pid, count in ((101, 5), (102, 7)):
        hot = metrics.HotFile(path / f"counter_hot{pid}.db")
        slot = hot.slot(key)
        for _ in range(count):
            hot.values[slot] += 1
    before = metrics.render(path).decode()
    assert _value(before, 'sdserve_requests_total{code="2xx"}') == 12
    metrics.retire(path, 101)
    assert not (path / "counter_hot101.db").exists()
    after = metrics.render(path).decode()
    assert _value(after, 'sdserve_requests_total{code="2xx"}') == 12  # nothing lost or doubled
    metrics.retire(path, 102)
    assert sorted(p.name for p in path.iterdir()) == ["counter_aggregate.db", "lock"]
    assert _value(metrics.render(path).decode(), 'sdserve_requests_total{code="2xx"}') == 12


def test_a_hot_file_grows_and_keeps_its_values(tmp_path: Path) -> None:
    hot = metrics.HotFile(tmp_path / "counter_hot7.db", capacity=4096)
    slots = [hot.slot(metrics._key("m", "m_total", {"i": str(i)}, "h")) for i in range(200)]
    for slot in slots:
        hot.values[slot] += slot
    text = metrics.render(tmp_path).decode()
    assert all(_value(text, f'm_total{{i="{i}"}}') == slot for i, slot in enumerate(slots))


@pytest.mark.asyncio
async def test_responses_are_counted_by_method_route_and_class(tmp_path: Path) -> None:
    """What a worker counts per response: a route of one method (remembered by route and
    status), a route of any method (each method apart), HEAD, a 404, an exempt path; and
    counts written after the files grew under the views :meth:`observe` writes through."""
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.router.add_get("/items/{id}", handler)
    app.router.add_route("*", "/any", handler)
    app.router.add_get("/livez", handler)
    # enough routes that their histograms outgrow the file's first size (1 MiB)
    for i in range(500):
        app.router.add_get(f"/many/{i}", handler)
    counted = metrics.RequestMetrics(tmp_path, exempt={"/livez"}, pid=1)

    async def respond(method: str, path: str, status: int, repeat: int = 1) -> None:
        request = make_mocked_request(method, path, app=app)
        request._match_info = await app.router.resolve(request)
        for _ in range(repeat):
            counted.observe(request, status, 0.002)

    await respond("GET", "/items/1", 200, 3)
    await respond("GET", "/items/2", 503)
    await respond("POST", "/any", 201, 2)
    await respond("DELETE", "/any", 204)
    await respond("HEAD", "/items/1", 200)
    await respond("GET", "/nowhere", 404, 2)
    await respond("GET", "/livez", 200, 5)
    for i in range(500):
        await respond("GET", f"/many/{i}", 200)
    assert (tmp_path / "histogram_hot1.db").stat().st_size > 1 << 20  # it grew
    await respond("GET", "/items/1", 200)  # after the growth, through the cached series
    text = metrics.render(tmp_path).decode()
    total = "sdserve_requests_total"
    assert _value(text, f'{total}{{code="2xx",method="GET",route="/items/{{id}}"}}') == 4
    assert _value(text, f'{total}{{code="5xx",method="GET",route="/items/{{id}}"}}') == 1
    assert _value(text, f'{total}{{code="2xx",method="POST",route="/any"}}') == 2
    assert _value(text, f'{total}{{code="2xx",method="DELETE",route="/any"}}') == 1
    assert _value(text, f'{total}{{code="2xx",method="HEAD",route="/items/{{id}}"}}') == 1
    assert _value(text, f'{total}{{code="4xx",method="GET",route="none"}}') == 2
    assert _value(text, f'{total}{{code="2xx",method="GET",route="/many/499"}}') == 1
    assert "/livez" not in text
    duration = 'sdserve_request_duration_seconds_count{method="GET",route="/items/{id}"}'
    assert _value(text, duration) == 5


# -- a service: supervised workers with a TCP admin socket --------------------------------


Started = Callable[..., Launcher]


@pytest_asyncio.fixture
async def service(tmp_path: Path, listen_sock: socket.socket) -> AsyncIterator[Started]:
    """``sdserve run relapp:create_app`` with an admin socket on 127.0.0.1 (``.admin``)."""
    made: list[Launcher] = []
    admin = socket.create_server((HOST, 0))
    appdir = tmp_path / "app"
    appdir.mkdir()
    write_app(appdir, "v1")

    def factory(*args: str, workers: int = 2) -> Launcher:
        argv = [sys.executable, "-m", "sdserve", "run", "relapp:create_app", "--log", "stderr"]
        argv += ["--workers", str(workers), *args]
        launcher = Launcher(
            argv,
            [("http", listen_sock), ("admin", admin)],
            workdir=tmp_path,
            env={"PYTHONDONTWRITEBYTECODE": "1"},
            cwd=appdir,
        )
        launcher.admin = admin.getsockname()[1]  # type: ignore[attr-defined]
        made.append(launcher)
        return launcher

    yield factory
    for launcher in made:
        await launcher.close()
    admin.close()


async def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(request_bytes(path, close=True))
        response = await asyncio.wait_for(read_response(reader), 10)
    finally:
        writer.close()
    return response.status, response.body.decode()


@pytest.mark.asyncio
@pytest.mark.parametrize("workers", [0, 2])
async def test_metrics_on_the_admin_socket_only_unless_asked(
    service: Started, port: int, workers: int
) -> None:
    launcher = service(workers=workers)
    await launcher.start()
    for _ in range(5):
        status, _ = await scrape(port, "/")
        assert status == 200
    status, text = await scrape(launcher.admin)  # type: ignore[attr-defined]
    assert status == 200
    assert _value(text, 'sdserve_requests_total{code="2xx",method="GET",route="/"}') == 5
    assert 'sdserve_build_info{version="' in text
    assert _value(text, "sdserve_ready") == 1
    assert 'route="/livez"' not in text  # probes are not the application's requests
    status, _ = await scrape(port)
    assert status == 404  # not on the main socket
    assert await launcher.stop() == ExitCode.OK


@pytest.mark.asyncio
async def test_idle_connections_closed_at_max_connections_are_counted(
    service: Started, port: int
) -> None:
    """A client waiting at max_connections gets the place of an idle keep-alive connection,
    and the metrics count it as it happens."""
    launcher = service("--max-connections", "1", "--keepalive-timeout", "60", workers=0)
    await launcher.start()
    _, text = await scrape(launcher.admin)  # type: ignore[attr-defined]
    assert _value(text, "sdserve_connections_reclaimed_total") == 0
    idle_r, idle_w = await asyncio.open_connection(HOST, port)
    idle_w.write(request_bytes("/"))
    assert (await read_response(idle_r)).status == 200  # then idle
    status, _ = await scrape(port, "/")  # waits, then takes the idle one's place
    assert status == 200
    assert await asyncio.wait_for(idle_r.read(), 10) == b""
    idle_w.close()
    _, text = await scrape(launcher.admin)  # type: ignore[attr-defined]
    assert _value(text, "sdserve_connections_reclaimed_total") == 1
    assert await launcher.stop() == ExitCode.OK


def _requests(text: str) -> float:
    return _value(text, 'sdserve_requests_total{code="2xx",method="GET",route="/"}')


@needs_prometheus
@pytest.mark.asyncio
@pytest.mark.timeout(300)  # about 20 s on an idle machine; a minute or more on a loaded one
async def test_prometheus_counts_every_request_through_reloads_kills_and_recycling(
    service: Started, port: int, tmp_path: Path
) -> None:
    launcher = service("--max-requests", "3000", "--max-requests-jitter", "500", workers=2)
    instance = await launcher.start()
    admin = launcher.admin  # type: ignore[attr-defined]
    series = '{__name__="sdserve_requests_total",code="2xx",method="GET",route="/"}'
    async with prometheus(tmp_path / "prom", f"{HOST}:{admin}") as prom:
        began = time.time()
        await prom.scraped_after(series, began, timeout=30)  # the counter at 0, before the load
        killed = 0
        async with load(HOST, port, keepalive=4, newconn=2) as stats:
            # Two workers that each recycle past 3,500 requests: by 7,500 one has (the
            # reloads below replace the workers before they could, when they are quick).
            await stats.wait_ok(7500, timeout=90)
            for i in range(10):
                if i in (2, 5, 8):
                    # the newest worker: the one most likely to be serving
                    os.kill(max(children(instance.pid)), signal.SIGKILL)
                    killed += 1
                    await stats.wait_ok(stats.total_ok + 300, timeout=30)
                code, out = await launcher.reload_command()
                assert code == 0, out
                await stats.wait_ok(stats.total_ok + 300, timeout=30)
        ended = time.time()
        last = await prom.scraped_after(series, ended, timeout=30)
        window = int(last - began) + 5
        # at the last sample itself: increase() extrapolates nothing past it
        increase = await prom.scalar(f"sum(increase({series}[{window}s]))", at=last)
        resets = await prom.scalar(f"sum(resets({series}[{window}s]))", at=last)
        count_resets = await prom.scalar(
            f"sum(resets(sdserve_request_duration_seconds_count[{window}s]))", at=last
        )
        samples = await prom.samples(series, time.time() - began + 5)
        restarts = await prom.query("sdserve_worker_restarts_total", at=last)
        reloads = await prom.scalar('sdserve_reloads_total{result="ok"}', at=last)
    _, text = await scrape(admin)
    served = _requests(text)
    causes = {r["metric"]["cause"]: float(r["value"][1]) for r in restarts}
    print(
        f"\nload: {stats.total_ok} ok, {stats.total_failed} failed {dict(stats.failed)}; "
        f"sdserve counted {served:.0f}; Prometheus: increase {increase:.1f} over "
        f"{len(samples)} samples, resets {resets:.0f}; restarts {causes}; reloads {reloads:.0f}"
    )
    assert killed == 3
    assert causes["crash"] == 3
    assert reloads == 10
    assert causes["recycle"] >= 1  # max_requests recycled some worker during the run
    assert resets == 0
    assert count_resets == 0
    assert all(b[1] >= a[1] for a, b in itertools.pairwise(samples))
    # The kills cut the requests in flight on the killed worker: the load saw them fail,
    # while the worker may have counted them as its handler returned.
    assert stats.total_ok <= served <= stats.total_ok + stats.total_failed
    assert abs(increase - stats.total_ok) <= 0.01 * stats.total_ok
    assert await launcher.stop() == ExitCode.OK


@pytest.mark.asyncio
@pytest.mark.timeout(600)  # 100 reloads: about 45 s on an idle machine, 2-3 min on a loaded one
async def test_the_series_stay_flat_over_100_reloads(service: Started, port: int) -> None:
    launcher = service(workers=1)
    instance = await launcher.start()
    admin = launcher.admin  # type: ignore[attr-defined]
    counts: dict[int, tuple[int, int]] = {}
    for i in range(1, 101):
        status, _ = await scrape(port, "/")
        assert status == 200
        code, out = await launcher.reload_command()
        assert code == 0, out
        if i in (1, 10, 50, 100):
            _, text = await scrape(admin)
            files = len(os.listdir(_metrics_dir(children(instance.pid)[0])))
            counts[i] = (_series(text), files)
            assert _requests(text) == i
            assert _value(text, 'sdserve_reloads_total{result="ok"}') == i
    print(f"\n(series, files) after reloads: {counts}")
    assert len(set(counts.values())) == 1, counts
    assert await launcher.stop() == ExitCode.OK


def _metrics_dir(pid: int) -> Path:
    """The directory a worker was started with."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    for item in environ:
        if item.startswith(metrics.ENV_DIR.encode() + b"="):
            return Path(item.split(b"=", 1)[1].decode())
    raise AssertionError(f"no {metrics.ENV_DIR} in the environment of {pid}")
