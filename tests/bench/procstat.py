"""What ``/proc`` says of a process, for the benchmarks: its descendants and its costs."""

from __future__ import annotations

import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (those still running)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo.extend(
                    int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()
                )
        except OSError:
            continue
    return out


def cost(pid: int) -> tuple[float, int, int]:
    """CPU seconds (user + system), minor and major page faults of ``pid`` so far; zeros for
    a process that is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0, 0
    return (int(fields[11]) + int(fields[12])) / _TICK, int(fields[7]), int(fields[9])
