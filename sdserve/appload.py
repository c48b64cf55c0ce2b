"""Importing the application: ``MODULE:FACTORY`` to an ``aiohttp.web.Application``."""

from __future__ import annotations

import asyncio
import difflib
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
    """``KeyError: 'DATABASE_URL'``, ``SyntaxError: expected ':'``: not the exception's repr
    (a syntax error's file and line are in its traceback, and in the reason's "at")."""
    if isinstance(exc, SyntaxError):
        return f"{type(exc).__name__}: {exc.msg}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _modules_in(directory: str) -> list[str]:
    """The modules and packages in ``directory``, by name (for a hint)."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    found = [n[:-3] for n in names if n.endswith(".py") and n != "__init__.py"]
    found += [n for n in names if os.path.isfile(os.path.join(directory, n, "__init__.py"))]
    return found


def _missing_attribute(spec: str, module: Any, module_name: str, attr: str, part: str) -> str:
    """Why ``attr`` is not found in ``module``: a namespace package, or a name that is
    not there (with the nearest one)."""
    where = getattr(module, "__file__", None)
    locations = list(
        getattr(getattr(module, "__spec__", None), "submodule_search_locations", []) or []
    )
    if where is None and locations:
        directory = locations[0]
        inside = [f"{module_name}.{m}" for m in _modules_in(directory)]
        hint = f"; it holds {', '.join(inside[:5])}" if inside else ""
        return (
            f"app {spec!r}: {module_name} was imported as a namespace package (directory "
            f"{directory}, no __init__.py), so it has no {attr}{hint}: give the module that "
            f"defines {attr} (MODULE:FACTORY, e.g. {module_name}.app:{attr}), or run sdserve "
            "from the directory that holds it"
        )
    close = difflib.get_close_matches(part, [n for n in dir(module) if not n.startswith("_")], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    shown = f" ({where})" if where else ""
    return f"app {spec!r}: module {module_name}{shown} has no {attr!r}{hint}"


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
        # the module itself (or a package on its way) is missing: nothing of the app ran
        if exc.name and (exc.name == module_name or module_name.startswith(exc.name + ".")):
            raise AppLoadError(f"app {spec!r}: no module named {exc.name!r}") from None
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
            raise AppLoadError(_missing_attribute(spec, module, module_name, attr, part)) from None
    if not callable(target) and not isinstance(target, web.Application):
        raise AppLoadError(f"app {spec!r}: {attr} is neither callable nor an Application")
    return target  # type: ignore[no-any-return]


def _check_app(spec: str, app: web.Application, what: str) -> web.Application:
    if app.frozen:
        # sdserve adds its health routes and middlewares to it: a frozen router refuses them
        raise AppLoadError(
            f"app {spec!r}: {what} an Application that is frozen (already started, or a "
            "sub-application of another): return a new one from the factory"
        )
    return app


async def build_app(spec: str) -> web.Application:
    """Import the factory and call it (sync or async); the result must be an Application."""
    factory = import_factory(spec)
    if isinstance(factory, web.Application):
        return _check_app(spec, factory, "the module holds")
    try:
        result = factory()
        if inspect.isawaitable(result):
            result = await result
    except Exception as exc:
        raise AppLoadError(f"app {spec!r}: the factory raised {_describe(exc)}") from exc
    if not isinstance(result, web.Application):
        raise AppLoadError(
            f"app {spec!r}: the factory returned {type(result).__name__}, "
            "not an aiohttp.web.Application"
        )
    return _check_app(spec, result, "the factory returned")


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

#: the code that calls the application's: sdserve, aiohttp and asyncio
_CALLER_DIRS = tuple(
    os.path.dirname(path) + os.sep for path in (__file__, web.__file__, asyncio.__file__)
)
#: code that is not the application's: those, and the standard library
_LIBRARY_DIRS = (*_CALLER_DIRS, sysconfig.get_paths()["stdlib"] + os.sep)


def _is_library(name: str) -> bool:
    return name.startswith("<") or name.startswith(_LIBRARY_DIRS)


#: frames of the import machinery (Python's own tracebacks leave them out too)
_IMPORTLIB = ("<frozen importlib.", os.path.dirname(importlib.__file__) + os.sep)
#: frames before the application's own that are left out: its callers, and imports
_CALLERS = (*_CALLER_DIRS, *_IMPORTLIB)


def _own_frame(exc: BaseException) -> tuple[str, int] | None:
    """The innermost frame of ``exc`` in the application's code, else None."""
    if isinstance(exc, SyntaxError) and exc.filename and exc.lineno:
        return exc.filename, exc.lineno
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if not _is_library(frame.filename):
            return frame.filename, frame.lineno or 0
    return None


def _trim(te: traceback.TracebackException, *, leading: bool = True) -> None:
    """Leave out the frames of sdserve that called the application (at the start only)
    and of the import machinery (anywhere), in ``te`` and the exceptions chained to it."""
    frames = list(te.stack)
    if leading:
        while frames and frames[0].filename.startswith(_CALLERS):
            frames.pop(0)
    frames = [f for f in frames if not f.filename.startswith(_IMPORTLIB)]
    te.stack = traceback.StackSummary.from_list(frames)
    for chained in (te.__cause__, te.__context__):
        if chained is not None:
            _trim(chained, leading=False)


def format_app_traceback(exc: BaseException) -> str:
    """The application's traceback: as Python prints it, less the frames of sdserve and
    of the import machinery before the application's first; a syntax error is its file,
    line, the source line and a caret, then the message."""
    te = traceback.TracebackException.from_exception(exc)
    _trim(te)
    return "".join(te.format()).rstrip()  # no frame left: no "Traceback" line either


def start_failure(reason: str, exc: BaseException | None = None) -> StartFailure:
    """Describe a failed start; ``exc`` is the application's own exception, if any."""
    if exc is None:
        return StartFailure(reason)
    text = format_app_traceback(exc)
    where = _own_frame(exc)
    if where is None:
        return StartFailure(reason, text)
    return StartFailure(f"{reason} (at {where[0]}, line {where[1]})", text, *where)
