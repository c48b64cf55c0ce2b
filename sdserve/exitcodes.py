"""The exit statuses of sdserve (``sdserve run`` and its workers).

What each means, and what systemd does with it, is in the README's table.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1
    #: bad configuration or usage
    CONFIG = 2
    #: the application did not load, or its checks / warm-up did not pass in time
    STARTUP = 3
    #: the drain did not finish cleanly: requests were cancelled at the shutdown deadline,
    #: or a draining worker had to be killed
    DRAIN_TIMEOUT = 4
    #: a second stop signal: exited at once, without draining
    FORCED = 5
    #: the supervisor gave up: replacement workers kept failing and none was left serving
    CRASH_LOOP = 6
