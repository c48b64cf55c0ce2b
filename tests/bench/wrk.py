"""wrk, the closed-loop HTTP load generator, run once and its report read."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class WrkRun:
    requests: int
    seconds: float
    #: wrk's own "Requests/sec"
    rate: float
    #: answers that were neither 2xx nor 3xx
    non_2xx: int


def run_wrk(
    url: str, *, connections: int, duration: float, threads: int = 1, pin: Sequence[str] = ()
) -> WrkRun:
    """``wrk -t threads -c connections -d duration url``, behind ``pin`` (a taskset
    command line, or nothing)."""
    out = subprocess.run(
        [*pin, "wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", url],
        capture_output=True,
        text=True,
        timeout=duration + 60,
        check=True,
    ).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    if rate is None or total is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    other = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    seconds = float(total.group(2)) / (1000 if total.group(3) == "ms" else 1)
    return WrkRun(
        requests=int(total.group(1)),
        seconds=seconds,
        rate=float(rate.group(1)),
        non_2xx=int(other.group(1)) if other else 0,
    )
