"""``python -m sdserve``.

A worker started by the supervisor lowers its CPU priority here, before the heavy
imports, so that warming up does not take CPU from the workers serving
(``_SDSERVE_WARMUP_NICE``; where the sandbox forbids it, it carries on as is).
"""

import contextlib
import os
import sys

if nice := int(os.environ.pop("_SDSERVE_WARMUP_NICE", "0") or 0):
    with contextlib.suppress(OSError):  # a sandbox may forbid it: then warm up as is
        os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) + nice)

from .cli import main

sys.exit(main())
