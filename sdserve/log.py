"""Logging set-up: journald with structured fields, or plain lines on stderr.

Lifecycle records carry upper-case ``extra`` fields (``SDSERVE_PHASE``,
``SDSERVE_CHECK``, ``SDSERVE_DURATION_MS``...). The journal handler sends them as
journal fields; on stderr they are appended as ``key=value``. Under systemd
without a journal stream, stderr lines get ``<N>`` syslog priority prefixes,
which journald and syslog understand.
"""

from __future__ import annotations

import logging
import os
import sys
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


def stderr_is_journal(environ: Mapping[str, str], stream: TextIO) -> bool:
    """True when stderr is the journal stream systemd connected (``JOURNAL_STREAM``)."""
    value = environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return bool(value) and f"{st.st_dev}" == dev and f"{st.st_ino}" == ino


def configure_logging(
    target: LogTarget,
    level: LogLevel,
    environ: Mapping[str, str] | None = None,
    stream: TextIO | None = None,
) -> str:
    """Configure the root logger; returns the target used (``journal`` or ``stderr``)."""
    env = os.environ if environ is None else environ
    out = sys.stderr if stream is None else stream
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(level.upper())
    under_systemd = "INVOCATION_ID" in env or "JOURNAL_STREAM" in env
    use_journal = target == "journal" or (target == "auto" and stderr_is_journal(env, out))
    missing = ""
    if use_journal:
        try:
            from systemd.journal import JournalHandler
        except ImportError as exc:
            missing = str(exc)
        else:
            root.addHandler(JournalHandler(SYSLOG_IDENTIFIER="sdserve"))
            return "journal"
    handler = logging.StreamHandler(out)
    handler.setFormatter(StderrFormatter(syslog_prefix=under_systemd))
    root.addHandler(handler)
    if missing:
        logging.getLogger("sdserve").warning(
            "cannot log to the journal (%s): logging to stderr instead", missing
        )
    return "stderr"
