"""The event loop that serves: uvloop when it is there (or asked for), else asyncio's own.

Only the processes that serve requests (a worker, or the single process of ``workers = 0``)
run on the chosen loop. The supervisor stays on asyncio: it serves no request, and its
child-process and pidfd handling is what the lifecycle tests exercise.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable

from .config import EventLoop

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def resolve(choice: EventLoop) -> str:
    """The loop ``choice`` gives here: "uvloop" or "asyncio"."""
    if choice == "auto":
        return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    return choice


def factory(choice: EventLoop) -> LoopFactory:
    """A function that makes a new loop of the kind ``choice`` gives."""
    if resolve(choice) == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def running() -> str:
    """The name of the running loop's kind: "uvloop" or "asyncio"."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"
