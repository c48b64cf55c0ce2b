"""Access logs with trace ids (sdserve.accesslog), and clients behind a real HAProxy
(sdserve.proxies)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import select
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from sdserve import accesslog
from sdserve.accesslog import (
    RANDOM_POOL,
    AccessLog,
    AccessWriter,
    Target,
    journal_entry,
    json_line,
    parse_traceparent,
)
from sdserve.exitcodes import ExitCode
from tests.conftest import LauncherFactory
from tests.helpers import HOST, Response, read_response

APP = "tests.apps.traced:create_app"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-00f067aa0ba902b7-01"


async def ask(
    port: int,
    path: str,
    headers: dict[str, str] | None = None,
    *,
    host: str = HOST,
    source: str | None = None,
) -> Response:
    """One request on a new connection (from ``source`` if given)."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    local = (source, 0) if source else None
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection(host, port, local_addr=local)
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: t\r\nUser-Agent: probe/1\r\n{extra}"
                "Connection: close\r\n\r\n".encode()
            )
            return await read_response(reader)
        finally:
            writer.close()


def access_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "SDSERVE_PHASE=access" in line]


#: a text line after its prefix: the message, then the fields it lacks
_TEXT_LINE = re.compile(
    r'(?P<client>[^\s>]+) "(?P<method>\S+) (?P<path>\S+)" (?P<status>\d+) (?P<bytes_out>\d+) '
    r'(?P<duration_ms>\d+\.\d{3})ms "(?P<user_agent>.*)" (?P<request_id>\S+) '
    r"SDSERVE_PHASE=access SDSERVE_BYTES_IN=(?P<bytes_in>\S+) SDSERVE_TRACE_ID=(?P<trace_id>\S+)$"
)


def values(line: str) -> dict[str, str]:
    """A text line's values, by the JSON line's names."""
    found = _TEXT_LINE.search(line.rstrip("\n"))
    assert found is not None, line
    return found.groupdict()


def test_traceparent_parsing() -> None:
    assert parse_traceparent(TRACEPARENT) == TRACE
    assert parse_traceparent(TRACEPARENT.upper()) == TRACE
    for bad in (
        "",
        "00-xyz",
        f"00-{'0' * 32}-00f067aa0ba902b7-01",
        f"ff-{TRACE}-00f067aa0ba902b7-01",
    ):
        assert parse_traceparent(bad) is None, bad


def logged(
    target: Target,
    *,
    method: str = "GET",
    path: str = "/",
    status: int = 200,
    out: str | None = None,
    length: str | None = None,
    agent: str = "curl/8",
    client: str | None = None,
    peer: object = ("127.0.0.1", 40000),
) -> Any:
    """What :meth:`AccessLog.ended` queues for ``target`` (a text line, or an entry) for a
    request answered with a response of Content-Length ``out`` (None: none, a stream)
    after 200 bytes were written: the values aiohttp's objects hold, as they hold them."""
    log = AccessLog(
        enabled=True, sample=1.0, probes=False, exempt=frozenset(), writer=AccessWriter(target)
    )
    sent = {"User-Agent": agent} | ({"Content-Length": length} if length is not None else {})
    message = SimpleNamespace(method=method, path=path, headers=CIMultiDictProxy(CIMultiDict(sent)))
    request = SimpleNamespace(_message=message, _transport_peername=peer)
    response = web.StreamResponse(status=status)
    if out is not None:
        response.headers["Content-Length"] = out
    response._body_length = 200  # as written, headers included
    conn = SimpleNamespace(
        client=client, request_began=time.monotonic() - 0.0123, request_id="rid", trace=TRACE
    )
    log.ended(conn, request, response)  # type: ignore[arg-type]
    return log._pending.pop()


def test_a_response_becomes_its_line_in_each_format() -> None:
    """What the loop queues becomes one line: the bytes in from the request's
    Content-Length, the bytes out from the response's (else what was written), the client
    from the peer (or the trusted proxy), the duration in ms; the same values in each
    format, and JSON's numbers plain decimals whatever a header held."""
    request = {"method": "POST", "path": "/p?q=1", "status": 201, "length": "12"}
    entry = logged("json", out="34", **request)  # type: ignore[arg-type]
    line = json.loads(json_line(entry))
    assert 12.3 <= line.pop("duration_ms") < 1000
    assert time.time() - 10 < line.pop("time") <= time.time()
    assert line == {
        "method": "POST", "path": "/p?q=1", "status": 201, "bytes_in": 12, "bytes_out": 34,
        "client": "127.0.0.1", "user_agent": "curl/8", "request_id": "rid", "trace_id": TRACE,
    }  # fmt: skip
    text = logged("syslog-stderr", out="34", **request)  # type: ignore[arg-type]
    assert re.fullmatch(
        r'127\.0\.0\.1 "POST /p\?q=1" 201 34 \d+\.\d{3}ms "curl/8" rid '
        f"SDSERVE_PHASE=access SDSERVE_BYTES_IN=12 SDSERVE_TRACE_ID={TRACE}\n",
        text,
    ), text
    journal = dict(item.split("=", 1) for item in journal_entry(entry).decode().splitlines())
    in_text = values(text)
    for name, value in line.items():
        assert str(value) == in_text[name] == journal[f"SDSERVE_{name.upper()}"]
    assert journal["MESSAGE"].split("ms ")[1] == text.split(" SDSERVE_")[0].split("ms ")[1]
    # JSON allows no leading zero, and a header an application set may hold anything:
    # JSON's numbers are plain decimals, and its strings escaped
    plain = logged("json", length="0012", out="a lot")
    assert json.loads(json_line(plain))["bytes_in"] == 12
    assert json.loads(json_line(plain))["bytes_out"] == 200
    # a streamed response (no Content-Length) and an empty one: what was written
    assert values(logged("stderr"))["bytes_out"] == "200"
    assert values(logged("stderr", status=204, out="0"))["bytes_out"] == "200"
    empty = logged("json", status=204, out="0", peer="/run/s.sock")
    assert json.loads(json_line(empty))["bytes_out"] == 200
    assert json.loads(json_line(empty))["client"] == "/run/s.sock"
    assert values(logged("stderr", peer="/run/s.sock"))["client"] == "/run/s.sock"
    # the client behind a trusted proxy wins over the peer
    assert values(logged("stderr", client="203.0.113.9"))["client"] == "203.0.113.9"
    # what a client sent, quotes and control characters included, stays valid JSON
    odd = logged("json", path='/a"b\\c\x01', agent='ag"ent')
    assert json.loads(json_line(odd))["path"] == '/a"b\\c\x01'
    assert json.loads(json_line(odd))["user_agent"] == 'ag"ent'


def test_generated_trace_ids_are_random_and_never_repeat() -> None:
    """Ids are sliced from random hex text drawn in pools: across several pools (and their
    seams) each trace id and span id is well formed and new, and a given traceparent's
    trace id is kept."""
    log = AccessLog(enabled=False, sample=1.0, probes=False, exempt=frozenset())
    ids = (RANDOM_POOL * 2 // 48) * 3 + 7  # three pools and some (48 hex digits an id)
    seen: set[str] = set()
    for n in range(ids):
        conn = SimpleNamespace()
        given = {"traceparent": TRACEPARENT} if n == 5 else {}
        request = SimpleNamespace(_message=SimpleNamespace(headers=given), _state={})
        log.begin(conn, request)  # type: ignore[arg-type]
        assert re.fullmatch(r"[0-9a-f]{32}", conn.trace), conn.trace
        assert re.fullmatch(r"[0-9a-f]{16}", conn.span), conn.span
        assert request._state["trace_id"] == conn.trace == conn.request_id
        if n == 5:
            assert conn.trace == TRACE
        else:
            seen.add(conn.trace)
        seen.add(conn.span)
    assert len(seen) == 2 * ids - 1


def test_the_writer_wakes_for_every_burst(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop wakes the writer only for an entry that finds the queue empty. Bursts of
    entries, each appended while the writer thread may be draining the last, are all
    written to a real pipe without a stop: a lost wake-up would leave a burst unwritten
    (and the read below would time out)."""
    monkeypatch.setattr(accesslog, "BATCH_PAUSE", 0.0005)  # many batches in little time
    read_end, write_end = os.pipe()
    writer = accesslog.AccessWriter("syslog-stderr")
    writer._fd = write_end
    log = AccessLog(enabled=True, sample=1.0, probes=False, exempt=frozenset(), writer=writer)
    writer.start()
    response = web.Response(text="hi")
    headers = CIMultiDictProxy(CIMultiDict({"User-Agent": "t"}))
    message = SimpleNamespace(path="/x", method="GET", headers=headers)
    request = SimpleNamespace(_message=message, _transport_peername=("127.0.0.1", 1))
    conn = SimpleNamespace(client=None, request_began=0.0, request_id="r", trace=TRACE)
    received = b""
    written = 0
    try:
        for burst in range(300):
            for _ in range(burst % 7 + 1):
                log.ended(conn, request, response)  # type: ignore[arg-type]
                written += 1
            while (lines := received.count(b"\n")) < written:
                ready, _, _ = select.select([read_end], [], [], 5.0)
                assert ready, f"burst {burst}: {lines} of {written} written"
                received += os.read(read_end, 1 << 16)
    finally:
        writer.stop()
        os.close(read_end)
        os.close(write_end)
    assert received.count(b"\n") == written
    assert writer.dropped == 0


@pytest.mark.asyncio
async def test_trace_ids_are_taken_or_generated_logged_and_returned(
    make_launcher: LauncherFactory, port: int
) -> None:
    launcher = make_launcher("--access-log", app=APP)
    instance = await launcher.start()
    given = await ask(port, "/items/7?x=1", {"traceparent": TRACEPARENT, "X-Request-Id": "abc-1"})
    assert given.status == 200
    assert json.loads(given.body)["trace_id"] == TRACE  # the application sees it
    assert given.headers["traceparent"].startswith(f"00-{TRACE}-")
    assert given.headers["x-request-id"] == "abc-1"
    made = await ask(port, "/whoami")
    generated = json.loads(made.body)["trace_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert generated != TRACE
    assert made.headers["traceparent"].split("-")[1] == generated
    assert made.headers["x-request-id"] == generated
    assert (await ask(port, "/livez")).status == 200  # a probe: not logged
    assert (await ask(port, "/nothing")).status == 404
    assert await launcher.stop() == ExitCode.OK  # the log's queue is written by now
    lines = access_lines(instance.log_text())
    assert len(lines) == 3, lines
    first, second, third = map(values, lines)
    assert first["trace_id"] == TRACE
    assert first["request_id"] == "abc-1"
    assert first["method"] == "GET"
    assert first["path"] == "/items/7?x=1"
    assert first["status"] == "200"
    assert first["client"] == "127.0.0.1"
    assert first["user_agent"] == "probe/1"
    assert first["bytes_in"] == "0"
    assert int(first["bytes_out"]) == len(given.body)
    assert float(first["duration_ms"]) >= 0
    assert second["trace_id"] == generated
    assert third["status"] == "404"
    assert "/livez" not in instance.log_text().split("ready after")[-1]


@pytest.mark.asyncio
async def test_json_lines_on_stdout_and_sampling(make_launcher: LauncherFactory, port: int) -> None:
    launcher = make_launcher(
        "--access-log", "--access-log-format", "json", "--access-log-sample", "0", app=APP
    )
    instance = await launcher.start()
    for _ in range(20):
        assert (await ask(port, "/whoami")).status == 200  # none sampled
    assert (await ask(port, "/fail", {"traceparent": TRACEPARENT})).status == 503  # always
    assert await launcher.stop() == ExitCode.OK
    lines = [json.loads(line) for line in instance.log_text().splitlines() if line.startswith("{")]
    assert len(lines) == 1, lines
    (line,) = lines
    assert line["status"] == 503
    assert line["path"] == "/fail"
    assert line["trace_id"] == TRACE
    assert set(line) >= {"time", "method", "duration_ms", "bytes_in", "client", "user_agent"}


# -- behind a real HAProxy -------------------------------------------------------------

HAPROXY = shutil.which("haproxy")


@pytest.fixture
def haproxy_sock() -> Iterator[socket.socket]:
    sock = socket.create_server((HOST, 0))
    yield sock
    sock.close()


@contextlib.asynccontextmanager
async def _haproxy(directory: Path, listener: socket.socket, backend: int) -> AsyncIterator[None]:
    assert HAPROXY is not None
    config = directory / "haproxy.cfg"
    config.write_text(
        "global\n  maxconn 100\n"
        "defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n"
        "  timeout server 30s\n"
        f"frontend web\n  bind fd@{listener.fileno()}\n  option forwardfor\n"
        "  default_backend app\n"
        f"backend app\n  server one {HOST}:{backend}\n"
    )
    proc = await asyncio.create_subprocess_exec(
        HAPROXY,
        "-db",
        "-f",
        str(config),
        pass_fds=[listener.fileno()],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)


@pytest.mark.asyncio
@pytest.mark.skipif(HAPROXY is None, reason="Debian's haproxy is not installed (make apt)")
async def test_the_client_behind_haproxy_is_seen_and_a_forged_header_is_not(
    make_launcher: LauncherFactory, port: int, tmp_path: Path, haproxy_sock: socket.socket
) -> None:
    launcher = make_launcher("--access-log", "--trusted-proxies", "127.0.0.1/32", app=APP)
    instance = await launcher.start()
    front = haproxy_sock.getsockname()[1]
    async with _haproxy(tmp_path, haproxy_sock, port):
        # the listening socket is HAProxy's already: the connection waits in its backlog
        proxied = await ask(front, "/whoami", source="127.0.0.5")
        assert proxied.status == 200
        # and a client behind it that tries to forge its address gets the proxy's word
        spoofing = await ask(front, "/whoami", {"X-Forwarded-For": "6.6.6.6"}, source="127.0.0.6")
    seen = json.loads(proxied.body)
    assert seen["remote"] == "127.0.0.5"
    assert seen["scheme"] == "http"
    # HAProxy appends the address it saw; sdserve takes the first untrusted from the right
    assert json.loads(spoofing.body)["remote"] == "127.0.0.6"
    direct = await ask(port, "/whoami", {"X-Forwarded-For": "6.6.6.6"}, source="127.0.0.7")
    assert json.loads(direct.body)["remote"] == "127.0.0.7"  # not a trusted peer: not believed
    forwarded = await ask(port, "/whoami", {"Forwarded": "for=6.6.6.6;proto=https"})
    # 127.0.0.1 is trusted: its Forwarded header is believed
    assert json.loads(forwarded.body) | {"trace_id": None} == {
        "trace_id": None,
        "remote": "6.6.6.6",
        "scheme": "https",
    }
    assert await launcher.stop() == ExitCode.OK
    clients = [values(line)["client"] for line in access_lines(instance.log_text())]
    assert clients == ["127.0.0.5", "127.0.0.6", "127.0.0.7", "6.6.6.6"]
