"""Importing the application: ``MODULE:FACTORY`` to an ``aiohttp.web.Application``."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

from aiohttp import web


class AppLoadError(Exception):
    """The application cannot be imported or built; the message says which part failed."""


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
        raise AppLoadError(f"app {spec!r}: importing {module_name} failed: {exc!r}") from exc
    except Exception as exc:
        raise AppLoadError(f"app {spec!r}: importing {module_name} failed: {exc!r}") from exc
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
