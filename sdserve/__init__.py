"""sdserve: run an aiohttp application as a systemd service that never drops a request.

The public API, for applications::

    from sdserve import add_check, add_warmup

    def create_app() -> web.Application:
        app = web.Application()
        add_check(app, "db", check_db, timeout=2.0)
        return app

and for embedding or tests: :func:`load_config`, :class:`Config`, :class:`Notifier`,
:class:`Worker`, the socket helpers, and the exceptions below.

Exceptions::

    ConfigError        configuration problems, all of them at once
    ActivationError    an fd from systemd is not a listening stream socket
    BindError          an address cannot be parsed or bound
    AppLoadError       MODULE:FACTORY cannot be imported or built
    StartupFailed      critical checks or warm-up did not pass before the deadline
"""

from .activation import ActivationError, Listener, listeners_from_environ
from .appload import AppLoadError
from .binding import BindError, bind_address
from .checks import Check, CheckResult, StartupFailed, add_check, add_warmup
from .config import Config, ConfigError, HealthConfig, load_config
from .notify import Notifier
from .worker import ExitCode, Worker

__all__ = [
    "ActivationError",
    "AppLoadError",
    "BindError",
    "Check",
    "CheckResult",
    "Config",
    "ConfigError",
    "ExitCode",
    "HealthConfig",
    "Listener",
    "Notifier",
    "StartupFailed",
    "Worker",
    "add_check",
    "add_warmup",
    "bind_address",
    "listeners_from_environ",
    "load_config",
]
__version__ = "0.1.0"
