"""Importing the application: ``MODULE:FACTORY`` to an ``aiohttp.web.Application``."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import os
import sys
import sysconfig
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web


class AppLoadError(Exception):
    """The application cannot be imported or built; the message says which part failed."""


def _describe(exc: BaseException) -> str:
    """``SyntaxError: invalid syntax (app.py, line 3)``, not the exception's repr."""
    return f"{type(exc).__name__}: {exc}"


def import_factory(spec: str) -> Callable[[], Any]:
    """Import ``MODULE:FACTORY``. The current directory is importable, as with gunicorn."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise AppLoadError(f"app {spec!r}: expected MODULE:FACTORY, e.g. myapp:create_app")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise AppLoadError(f"app {spec!r}: no module named {exc.name!r}") from exc
        raise AppLoadError(
            f"app {spec!r}: importing {module_name} failed: {_describe(exc)}"
        ) from exc
    except Exception as exc:
        raise AppLoadError(
            f"app {spec!r}: importing {module_name} failed: {_describe(exc)}"
        ) from exc
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise AppLoadError(f"app {spec!r}: module {module_name} has no {attr!r}") from None
    if not callable(target) and not isinstance(target, web.Application):
        raise AppLoadError(f"app {spec!r}: {attr} is neither callable nor an Application")
    return target  # type: ignore[no-any-return]


async def build_app(spec: str) -> web.Application:
    """Import the factory and call it (sync or async); the result must be an Application."""
    factory = import_factory(spec)
    if isinstance(factory, web.Application):
        return factory
    try:
        result = factory()
        if inspect.isawaitable(result):
            result = await result
    except Exception as exc:
        raise AppLoadError(f"app {spec!r}: the factory raised {exc!r}") from exc
    if not isinstance(result, web.Application):
        raise AppLoadError(
            f"app {spec!r}: the factory returned {type(result).__name__}, "
            "not an aiohttp.web.Application"
        )
    return result


@dataclass(frozen=True)
class StartFailure:
    """Why a start failed, for the journal: the reason, and the application's traceback."""

    reason: str
    #: the formatted traceback of the application's exception ("" when there is none)
    traceback: str = ""
    #: the innermost frame in the application's own code (not sdserve, aiohttp or stdlib)
    file: str | None = None
    line: int | None = None

    def to_json(self) -> str:
        tb = self.traceback[-MAX_TRACEBACK:]
        return json.dumps(
            {"reason": self.reason, "traceback": tb, "file": self.file, "line": self.line}
        )

    @classmethod
    def from_json(cls, text: str) -> StartFailure:
        data = json.loads(text)
        line = data.get("line")
        return cls(
            str(data.get("reason", "")),
            str(data.get("traceback", "")),
            data.get("file") if isinstance(data.get("file"), str) else None,
            line if isinstance(line, int) else None,
        )


#: a report to the supervisor fits one datagram
MAX_TRACEBACK = 16_000

#: code that is not the application's: sdserve, aiohttp, asyncio and the standard library
_LIBRARY_DIRS = (
    *(os.path.dirname(path) + os.sep for path in (__file__, web.__file__, asyncio.__file__)),
    sysconfig.get_paths()["stdlib"] + os.sep,
)


def _own_frame(exc: BaseException) -> tuple[str, int] | None:
    """The innermost frame of ``exc`` in the application's code, else its innermost frame."""
    if isinstance(exc, SyntaxError) and exc.filename and exc.lineno:
        return exc.filename, exc.lineno
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        name = frame.filename
        if not name.startswith("<") and not name.startswith(_LIBRARY_DIRS):
            return name, frame.lineno or 0
    return (frames[-1].filename, frames[-1].lineno or 0) if frames else None


def start_failure(reason: str, exc: BaseException | None = None) -> StartFailure:
    """Describe a failed start; ``exc`` is the application's own exception, if any."""
    if exc is None:
        return StartFailure(reason)
    text = "".join(traceback.format_exception(exc)).rstrip()
    where = _own_frame(exc)
    if where is None:
        return StartFailure(reason, text)
    return StartFailure(f"{reason} (at {where[0]}, line {where[1]})", text, *where)
