"""Logging never blocks the caller (issue 11): a stalled target stalls the writer thread only,
drops are counted and reported once the target is back."""

from __future__ import annotations

import datetime
import io
import json
import logging
import os
import threading
import time
from collections.abc import Iterator

import pytest

from sdserve.log import QUEUE_SIZE, configure_logging, dropped_lines, stop_logging


@pytest.fixture
def stalled_stderr() -> Iterator[tuple[int, object]]:
    """A stream onto a pipe that nobody reads yet: writes block once its buffer is full."""
    read_fd, write_fd = os.pipe()
    stream = os.fdopen(write_fd, "w", buffering=1)
    try:
        yield read_fd, stream
    finally:
        stop_logging(timeout=0.1)
        if not stream.closed:
            stream.close()
        os.close(read_fd)


def test_a_stalled_log_target_never_blocks_the_caller(
    stalled_stderr: tuple[int, object],
) -> None:
    read_fd, stream = stalled_stderr
    configure_logging("stderr", "info", environ={}, stream=stream)  # type: ignore[arg-type]
    log = logging.getLogger("sdserve.test")
    lines = QUEUE_SIZE * 3
    done = threading.Event()

    def flood() -> None:
        for i in range(lines):
            log.info("line %d %s", i, "x" * 100)  # 120 bytes: the pipe fills after ~500
        done.set()

    flooder = threading.Thread(target=flood)
    flooder.start()
    # the caller is never held up by the pipe nobody reads (the bound only fails the test)
    assert done.wait(60), "logging blocked the caller"
    dropped = dropped_lines()
    assert dropped > 0
    assert dropped < lines
    # the reader comes back: the writer drains the queue and reports the drops, once
    chunks: list[bytes] = []
    reader = threading.Thread(
        target=lambda: chunks.extend(iter(lambda: os.read(read_fd, 65536), b""))
    )
    reader.start()
    stop_logging(timeout=30)
    stream.close()  # type: ignore[attr-defined]
    reader.join(30)
    text = b"".join(chunks).decode()
    notes = [line for line in text.splitlines() if "log line(s) dropped" in line]
    assert len(notes) == 1, notes
    assert f"({dropped} in all)" in notes[0]
    assert "SDSERVE_PHASE=log-dropped" in notes[0]
    written = sum(1 for line in text.splitlines() if ": line " in line)
    assert written + dropped == lines


def test_json_lines_on_stdout_carry_the_fields_and_parse() -> None:
    """``log = "json"``: one JSON object per line on stdout, extra fields included."""
    read_fd, write_fd = os.pipe()
    out = os.fdopen(write_fd, "w")
    err = io.StringIO()
    try:
        assert configure_logging("json", "info", environ={}, stream=err, stdout=out) == "json"
        log = logging.getLogger("sdserve.test")
        log.info("two\nlines %s", "here", extra={"SDSERVE_PHASE": "ready", "SDSERVE_PID": 9})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("it failed")
        log.debug("below the level")
    finally:
        stop_logging(timeout=10)
        out.close()
    with os.fdopen(read_fd) as lines:
        records = [json.loads(line) for line in lines]
    assert err.getvalue() == ""
    assert len(records) == 2
    first, second = records
    assert first["message"] == "two\nlines here"
    assert first["level"] == "info"
    assert first["logger"] == "sdserve.test"
    assert first["pid"] == os.getpid()
    assert first["phase"] == "ready"
    assert first["extra_pid"] == 9  # an extra field never replaces a key of the format
    stamp = datetime.datetime.fromisoformat(first["timestamp"])
    assert stamp.utcoffset() == datetime.timedelta(0)
    assert abs(time.time() - stamp.timestamp()) < 600
    assert second["level"] == "error"
    assert "ValueError: boom" in second["exception"]
