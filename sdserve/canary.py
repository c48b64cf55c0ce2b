"""A canary reload: the new code serves beside the old, and is judged before it replaces it.

``sdserve reload --canary N --watch 30s`` (or ``canary_workers`` / ``canary_watch`` in
the configuration) starts ``N`` workers of the new generation beside every worker of
the one serving; the listening sockets are shared, so new connections split between
them. Each worker counts its responses by status and latency (:class:`RequestStats`,
application routes only: health probes are left out) and reports them to the supervisor
four times a second (when they changed). Over the watch window the supervisor compares
the canary workers with the old generation (:func:`judge`):

- **errors:** the canary's 5xx ratio may exceed the old generation's by at most
  ``canary_error_margin`` (0.02: two points);
- **latency:** the canary's p99 may be at most ``canary_latency_factor`` times the old
  one's (3x), plus 20 ms, so that a fast handler's noise never decides.

A failure decides as soon as the canary has served ``canary_min_requests`` (a release
that answers 500 everywhere is rolled back within a quarter of a second under load); a
pass waits for the whole window. With too little traffic to judge, the reload completes,
and says so. A rollback retires the canary workers (their idle connections go to the old
generation, as on any reload) and fails ``sdserve reload`` with the reason; the requests
lost are only the canary's own errors.

The latency histogram has fixed buckets (a factor of about 1.41 from 1 ms to 46 s), so
a p99 is known within that factor, which is far finer than the factor judged.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

#: bucket upper bounds, seconds: 1 ms x √2^i (the last bucket holds everything above)
BOUNDS: tuple[float, ...] = tuple(0.001 * 2 ** (i / 2) for i in range(32))
#: p99s below this apart are never a regression (a fast handler's noise)
LATENCY_SLACK = 0.02
#: the notify field in which a worker reports its counts
STATS_FIELD = "X_SDSERVE_STATS"


@dataclass
class RequestStats:
    """One worker's responses since it started: counts by class, and latencies."""

    total: int = 0
    errors: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BOUNDS) + 1))

    def record(self, status: int, seconds: float) -> None:
        self.total += 1
        if status >= 500:
            self.errors += 1
        self.buckets[bisect.bisect_left(BOUNDS, seconds)] += 1

    def encode(self) -> str:
        return ",".join(map(str, (self.total, self.errors, *self.buckets)))

    @classmethod
    def decode(cls, text: str) -> RequestStats:
        """The counts of :meth:`encode`; ValueError when they are not that."""
        numbers = [int(n) for n in text.split(",")]
        if len(numbers) != 2 + len(BOUNDS) + 1 or min(numbers) < 0:
            raise ValueError(f"not request stats: {text[:80]!r}")
        return cls(numbers[0], numbers[1], numbers[2:])

    def minus(self, earlier: RequestStats) -> RequestStats:
        """What was counted since ``earlier`` (the same worker's)."""
        return RequestStats(
            self.total - earlier.total,
            self.errors - earlier.errors,
            [a - b for a, b in zip(self.buckets, earlier.buckets, strict=True)],
        )


def combined(parts: Iterable[RequestStats]) -> RequestStats:
    out = RequestStats()
    for part in parts:
        out.total += part.total
        out.errors += part.errors
        out.buckets = [a + b for a, b in zip(out.buckets, part.buckets, strict=True)]
    return out


def quantile(stats: RequestStats, q: float) -> float:
    """The upper bound of the bucket that holds the ``q`` quantile (0 when empty)."""
    if stats.total == 0:
        return 0.0
    rank = q * stats.total
    seen = 0
    for i, count in enumerate(stats.buckets):
        seen += count
        if seen >= rank:
            return BOUNDS[i] if i < len(BOUNDS) else float("inf")
    return float("inf")


@dataclass(frozen=True)
class Thresholds:
    min_requests: int
    error_margin: float
    latency_factor: float


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str


def describe(stats: RequestStats) -> str:
    if stats.total == 0:
        return "no requests"
    p99 = quantile(stats, 0.99)
    return (
        f"{stats.total} requests, 5xx {stats.errors / stats.total:.1%}, p99 <= {p99 * 1000:.0f} ms"
    )


def judge(
    old: RequestStats, new: RequestStats, limits: Thresholds, *, final: bool
) -> Verdict | None:
    """Compare the canary (``new``) with the generation serving (``old``) over the same
    window. None: no decision yet (only a failure decides before the window ends)."""
    if new.total < limits.min_requests:
        if not final:
            return None
        return Verdict(
            True,
            f"too little traffic to judge ({new.total} canary requests, "
            f"{limits.min_requests} wanted): completing the reload",
        )
    problems: list[str] = []
    old_ratio = old.errors / old.total if old.total else 0.0
    new_ratio = new.errors / new.total
    if new_ratio > old_ratio + limits.error_margin:
        problems.append(
            f"5xx {new_ratio:.1%} against {old_ratio:.1%} "
            f"(at most {limits.error_margin:.0%} more allowed)"
        )
    if old.total:
        old_p99, new_p99 = quantile(old, 0.99), quantile(new, 0.99)
        if new_p99 > old_p99 * limits.latency_factor + LATENCY_SLACK:
            problems.append(
                f"p99 <= {new_p99 * 1000:.0f} ms against <= {old_p99 * 1000:.0f} ms "
                f"(at most {limits.latency_factor:g}x allowed)"
            )
    summary = f"canary: {describe(new)}; old: {describe(old)}"
    if problems:
        return Verdict(False, f"{'; '.join(problems)} ({summary})")
    if not final:
        return None
    return Verdict(True, summary)


def window(
    now: dict[int, RequestStats], base: dict[int, RequestStats], ids: Sequence[int]
) -> RequestStats:
    """The counts of workers ``ids`` since their baselines (a worker without one: since
    its start)."""
    return combined(now[i].minus(base.get(i, RequestStats())) for i in ids if i in now)
