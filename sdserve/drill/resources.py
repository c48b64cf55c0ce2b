"""The target's resources, read from /proc: processes, open fds and RSS of a process tree."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ResourceSample:
    """One reading of the target's process tree, ``t`` seconds after the drill's start."""

    t: float
    pid: int | None
    processes: int
    fds: int
    rss_bytes: int


def parent_map(proc: Path = Path("/proc")) -> dict[int, int]:
    """PID -> parent PID of every process visible now."""
    out: dict[int, int] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # The command name is in parentheses and may contain spaces or ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        out[int(entry.name)] = int(fields[1])
    return out


def children(pid: int, proc: Path = Path("/proc")) -> list[int]:
    """Direct children of ``pid``, oldest (lowest start time) first."""
    kids = [p for p, pp in parent_map(proc).items() if pp == pid]
    return sorted(kids, key=lambda p: _start_time(p, proc))


def descendants(pid: int, proc: Path = Path("/proc")) -> list[int]:
    """``pid`` and every process below it."""
    parents = parent_map(proc)
    tree = [pid]
    for p in tree:  # grows while iterating; bounded by the number of processes
        tree.extend(c for c, pp in parents.items() if pp == p and c not in tree)
        if len(tree) > len(parents) + 1:
            break
    return tree


def _start_time(pid: int, proc: Path) -> int:
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return 0
    return int(stat[stat.rfind(")") + 2 :].split()[19])


def sample(pid: int | None, t: float, proc: Path = Path("/proc")) -> ResourceSample:
    """Count processes, fds and resident memory (summed, shared pages counted twice)."""
    if pid is None or not (proc / str(pid)).exists():
        return ResourceSample(t, None, 0, 0, 0)
    processes = fds = rss = 0
    for p in descendants(pid, proc):
        base = proc / str(p)
        try:
            n_fds = len(os.listdir(base / "fd"))
            rss_pages = int((base / "statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        processes += 1
        fds += n_fds
        rss += rss_pages * _PAGE
    return ResourceSample(t, pid, processes, fds, rss)
