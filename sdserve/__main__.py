"""``python -m sdserve``.

A worker started by the supervisor lowers its CPU priority here, before the heavy
imports, so that warming up does not take CPU from the workers serving
(``_SDSERVE_WARMUP_NICE``). It does so only where it may return to its current
priority once ready (``RLIMIT_NICE``, i.e. ``LimitNICE=``, or CAP_SYS_NICE):
otherwise it would stay behind every other process of the host.
"""

import contextlib
import os
import resource
import sys

_CAP_SYS_NICE = 23


def _may_return_to(nice: int) -> bool:
    if resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20 - nice:
        return True
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_SYS_NICE & 1)
    return False


if nice := int(os.environ.pop("_SDSERVE_WARMUP_NICE", "0") or 0):
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if _may_return_to(current):
        with contextlib.suppress(OSError):  # a sandbox may forbid it: then warm up as is
            os.setpriority(os.PRIO_PROCESS, 0, current + nice)

from .cli import exit_without_teardown, main  # noqa: E402 - after the priority change

code = main()
if sys.argv[1:2] in (["run"], ["worker"]):
    exit_without_teardown(code)  # a serving process: its exit is part of a restart's gap
sys.exit(code)
