"""Logging set-up: journald with structured fields, plain lines on stderr, or JSON on stdout.

Lifecycle records carry upper-case ``extra`` fields (``SDSERVE_PHASE``,
``SDSERVE_CHECK``, ``SDSERVE_DURATION_MS``...). The journal handler sends them as
journal fields; on stderr they are appended as ``key=value``. Under systemd
without a journal stream, stderr lines get ``<N>`` syslog priority prefixes,
which journald and syslog understand. With ``log = "json"`` (containers, where
stdout is collected), each record is one JSON object on one line of stdout
(:class:`JsonFormatter`): ``timestamp``, ``level``, ``logger``, ``message``,
``pid``, the ``extra`` fields in lower case without their ``SDSERVE_`` prefix
(``phase``, ``check``...), and ``exception`` when there is one.

Nothing here blocks the event loop. A record is put on a bounded queue
(:data:`QUEUE_SIZE`) and a thread of its own writes it: a journald that stalls
(its socket full, the process stopped) stalls that thread only. When the queue is
full, records are dropped and counted (:attr:`LogQueue.dropped`); once the writer
catches up it logs how many were lost, once, as a warning
(``SDSERVE_PHASE=log-dropped``).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import logging
import logging.handlers
import os
import queue
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, TextIO

from .config import LogLevel, LogTarget

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def fields(phase: str, **more: Any) -> dict[str, Any]:
    """The ``extra`` of a lifecycle record: ``SDSERVE_PHASE`` and ``SDSERVE_<KEY>`` fields."""
    return {"SDSERVE_PHASE": phase, **{f"SDSERVE_{k.upper()}": v for k, v in more.items()}}


def _fields(record: logging.LogRecord) -> str:
    extra = [f"{k}={v}" for k, v in record.__dict__.items() if k.startswith("SDSERVE_")]
    return (" " + " ".join(extra)) if extra else ""


class StderrFormatter(logging.Formatter):
    """``[<N>]LEVEL name: message key=value...``; ``<N>`` only under systemd."""

    def __init__(self, syslog_prefix: bool) -> None:
        super().__init__()
        self.syslog_prefix = syslog_prefix

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage() + _fields(record)
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if self.syslog_prefix:
            prio = _PRIORITY.get(record.levelno, 6)
            return "\n".join(f"<{prio}>{line}" for line in text.splitlines())
        stamp = self.formatTime(record, "%H:%M:%S")
        return f"{stamp} {record.levelname:<7} {record.name}[{record.process}]: {text}"


#: the keys :class:`JsonFormatter` writes itself; an extra field of the same name is
#: written with an ``extra_`` prefix instead of replacing them
JSON_KEYS = ("timestamp", "level", "logger", "message", "pid", "exception")
_FIELD_PREFIX = "SDSERVE_"


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in the message are escaped).

    ``timestamp`` is RFC 3339 in UTC with microseconds, ``level`` the lower-case level
    name, ``logger`` the logger's name, ``pid`` the writing process (a supervisor and its
    workers share stdout). Every ``SDSERVE_*`` extra field follows, named in lower case
    without the prefix; values that are not JSON scalars are written as their ``str()``.
    Reusable for any logger whose lines go to a log collector (``format_fields``).
    """

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        out: dict[str, Any] = {
            "timestamp": stamp.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        out.update(self.format_fields(record))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"))

    @staticmethod
    def format_fields(record: logging.LogRecord) -> dict[str, Any]:
        """The record's ``SDSERVE_*`` extra fields as JSON keys (``SDSERVE_PHASE``: ``phase``)."""
        extra: dict[str, Any] = {}
        for key, value in record.__dict__.items():
            if not key.startswith(_FIELD_PREFIX):
                continue
            name = key[len(_FIELD_PREFIX) :].lower()
            extra[f"extra_{name}" if name in JSON_KEYS else name] = _jsonable(value)
        return extra


def stderr_is_journal(environ: Mapping[str, str], stream: TextIO) -> bool:
    """True when stderr is the journal stream systemd connected (``JOURNAL_STREAM``)."""
    value = environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return bool(value) and f"{st.st_dev}" == dev and f"{st.st_ino}" == ino


#: records waiting for the writer thread; past this they are dropped
QUEUE_SIZE = 10_000
#: while the writer stays behind, drops are reported at most this often (seconds)
NOTE_INTERVAL = 10.0


class LogQueue(logging.handlers.QueueHandler):
    """Puts records on a bounded queue without waiting, for a writer thread of its own that
    hands them to ``target``; counts what did not fit."""

    def __init__(self, target: logging.Handler, size: int = QUEUE_SIZE) -> None:
        self.records: queue.Queue[logging.LogRecord | None] = queue.Queue(size)
        super().__init__(self.records)
        self.target = target
        self.dropped = 0
        self._lock = threading.Lock()
        self.writer = _Writer(self)
        self.writer.start()

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.records.put_nowait(record)
        except queue.Full:
            with self._lock:
                self.dropped += 1

    def stop(self, timeout: float) -> None:
        """Let the writer finish what is queued, for at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(queue.Full):
            self.records.put(None, timeout=timeout)  # waits for room while the writer drains
        self.writer.join(max(0.0, deadline - time.monotonic()))


class _Writer(threading.Thread):
    """Writes queued records to the real handler; reports drops once it has caught up."""

    def __init__(self, source: LogQueue) -> None:
        super().__init__(name="sdserve-log", daemon=True)
        self.source = source
        self.reported = 0
        self.next_note = time.monotonic() + NOTE_INTERVAL

    def run(self) -> None:
        target = self.source.target
        while (record := self.source.records.get()) is not None:
            target.handle(record)
            # Drops are reported once the writer has caught up (the queue is empty: the
            # target is back, and the next record may not come for a long time), and every
            # NOTE_INTERVAL while it stays behind: a note per record would double the load
            # on a target that is already too slow.
            if self.source.records.empty() or time.monotonic() >= self.next_note:
                self._report(target)
        self._report(target)

    def _report(self, target: logging.Handler) -> None:
        dropped = self.source.dropped
        if dropped > self.reported:
            target.handle(self._drop_note(dropped - self.reported, dropped))
            self.reported = dropped
            self.next_note = time.monotonic() + NOTE_INTERVAL

    @staticmethod
    def _drop_note(lost: int, total: int) -> logging.LogRecord:
        note = logging.LogRecord(
            "sdserve.log",
            logging.WARNING,
            __file__,
            0,
            "%d log line(s) dropped: the log target did not keep up (%d in all)",
            (lost, total),
            None,
        )
        note.__dict__.update(fields("log-dropped", dropped=lost, dropped_total=total))
        return note


class _JsonQueue(LogQueue):
    """A :class:`LogQueue` that keeps a record's traceback apart from its message (the
    base class merges them), for :class:`JsonFormatter`'s ``exception`` key."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        prepared = copy.copy(record)
        prepared.message = prepared.msg = record.getMessage()
        prepared.args = None
        if record.exc_info and not record.exc_text:
            prepared.exc_text = logging.Formatter().formatException(record.exc_info)
        prepared.exc_info = None
        prepared.stack_info = None
        return prepared


def _queues() -> list[LogQueue]:
    return [h for h in logging.getLogger().handlers if isinstance(h, LogQueue)]


def stop_logging(timeout: float = 2.0) -> None:
    """Let the writer finish what is queued, for at most ``timeout`` seconds: it may be
    stuck on a stalled journald, and then the rest goes with the process."""
    for source in _queues():
        logging.getLogger().removeHandler(source)
        source.stop(timeout)


def dropped_lines() -> int:
    """Log records dropped so far because the writer could not keep up."""
    return sum(source.dropped for source in _queues())


def configure_logging(
    target: LogTarget,
    level: LogLevel,
    environ: Mapping[str, str] | None = None,
    stream: TextIO | None = None,
    stdout: TextIO | None = None,
) -> str:
    """Configure the root logger; returns the target used (``journal``, ``stderr`` or
    ``json``). ``stream`` stands for stderr, ``stdout`` for stdout (the json target's)."""
    env = os.environ if environ is None else environ
    out = sys.stderr if stream is None else stream
    stop_logging()
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(level.upper())
    if target == "json":
        lines = logging.StreamHandler(sys.stdout if stdout is None else stdout)
        lines.setFormatter(JsonFormatter())
        root.addHandler(_JsonQueue(lines))
        return "json"
    under_systemd = "INVOCATION_ID" in env or "JOURNAL_STREAM" in env
    use_journal = target == "journal" or (target == "auto" and stderr_is_journal(env, out))
    missing = ""
    if use_journal:
        try:
            from systemd.journal import JournalHandler
        except ImportError as exc:
            missing = str(exc)
        else:
            from .journal import JournalSender

            # systemd-python formats the entry; our sender sends it without holding the GIL
            journal = JournalHandler(sender_function=JournalSender(), SYSLOG_IDENTIFIER="sdserve")
            root.addHandler(LogQueue(journal))
            return "journal"
    handler = logging.StreamHandler(out)
    handler.setFormatter(StderrFormatter(syslog_prefix=under_systemd))
    root.addHandler(LogQueue(handler))
    if missing:
        logging.getLogger("sdserve").warning(
            "cannot log to the journal (%s): logging to stderr instead", missing
        )
    return "stderr"
