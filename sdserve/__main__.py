"""``python -m sdserve``.

A worker started by the supervisor lowers its CPU priority here, before the heavy
imports, so that warming up does not take CPU from the workers serving
(``_SDSERVE_WARMUP_NICE``). It does so only where it may return to its current
priority once ready (``RLIMIT_NICE``, i.e. ``LimitNICE=``, or CAP_SYS_NICE):
otherwise it would stay behind every other process of the host.
"""

import os
import sys

from .template import lower_priority_for_warm_up

lower_priority_for_warm_up(os.environ)

from .cli import exit_without_teardown, main  # noqa: E402 - after the priority change

code = main()
if sys.argv[1:2] in (["run"], ["worker"]):
    exit_without_teardown(code)  # a serving process: its exit is part of a restart's gap
sys.exit(code)
