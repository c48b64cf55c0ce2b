"""sdserve: run an aiohttp application as a systemd service that never drops a request.

The public API, for applications::

    from sdserve import add_check, add_warmup, draining

    def create_app() -> web.Application:
        app = web.Application()
        add_check(app, "db", check_db, timeout=2.0)
        return app

    async def events(request):  # a stream that ends when the drain begins
        ...
        await draining(request).wait()

and for embedding or tests: :func:`load_config`, :class:`Config`, :class:`Notifier`,
:class:`Worker`, the socket helpers, and the exceptions below.

Exceptions::

    ConfigError        configuration problems, all of them at once
    ActivationError    an fd from systemd is not a listening stream socket
    BindError          an address cannot be parsed or bound
    AppLoadError       MODULE:FACTORY cannot be imported or built
    StartupFailed      critical checks or warm-up did not pass before the deadline

Names are imported on first use, so that ``python -m sdserve`` can act before the
heavy imports (a worker lowers its CPU priority first).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .activation import ActivationError as ActivationError
    from .activation import Listener as Listener
    from .activation import listeners_from_environ as listeners_from_environ
    from .appload import AppLoadError as AppLoadError
    from .binding import BindError as BindError
    from .binding import bind_address as bind_address
    from .checks import Check as Check
    from .checks import CheckResult as CheckResult
    from .checks import CheckThread as CheckThread
    from .checks import StartupFailed as StartupFailed
    from .checks import add_check as add_check
    from .checks import add_warmup as add_warmup
    from .config import Config as Config
    from .config import ConfigError as ConfigError
    from .config import HealthConfig as HealthConfig
    from .config import load_config as load_config
    from .drain import add_drain_hook as add_drain_hook
    from .drain import draining as draining
    from .exitcodes import ExitCode as ExitCode
    from .notify import Notifier as Notifier
    from .worker import Worker as Worker

_EXPORTS = {
    "ActivationError": ".activation",
    "AppLoadError": ".appload",
    "BindError": ".binding",
    "Check": ".checks",
    "CheckThread": ".checks",
    "CheckResult": ".checks",
    "Config": ".config",
    "ConfigError": ".config",
    "ExitCode": ".exitcodes",
    "HealthConfig": ".config",
    "Listener": ".activation",
    "Notifier": ".notify",
    "StartupFailed": ".checks",
    "Worker": ".worker",
    "add_check": ".checks",
    "add_drain_hook": ".drain",
    "add_warmup": ".checks",
    "bind_address": ".binding",
    "draining": ".drain",
    "listeners_from_environ": ".activation",
    "load_config": ".config",
}

__all__ = [
    "ActivationError",
    "AppLoadError",
    "BindError",
    "Check",
    "CheckResult",
    "CheckThread",
    "Config",
    "ConfigError",
    "ExitCode",
    "HealthConfig",
    "Listener",
    "Notifier",
    "StartupFailed",
    "Worker",
    "add_check",
    "add_drain_hook",
    "add_warmup",
    "bind_address",
    "draining",
    "listeners_from_environ",
    "load_config",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sdserve' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
