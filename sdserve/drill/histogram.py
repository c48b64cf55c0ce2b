"""A log-linear latency histogram (1 us resolution, relative error below 1/64).

Values are microseconds.  Below 128 us every value has its own bucket; above it each
power of two is split into 64 equal buckets, so the width of a bucket is at most
1/64 of its lower bound.  Percentiles are read from the bucket counts and reported
as the middle of the bucket (clamped to the exact maximum, which is kept apart).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

SUB_BITS = 7
_HALF = 1 << (SUB_BITS - 1)  # 64
_FULL = 1 << SUB_BITS  # 128

#: The percentiles the drill reports everywhere.
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def bucket_index(us: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The bucket of each value (vectorised)."""
    v = np.maximum(us, 0).astype(np.int64)
    # bit_length via log2 on the float is exact enough for values below 2**52.
    bits = np.where(v > 0, np.floor(np.log2(np.maximum(v, 1))).astype(np.int64) + 1, 0)
    shift = np.maximum(bits - SUB_BITS, 0)
    idx = np.where(shift == 0, v, shift * _HALF + (v >> shift))
    return idx.astype(np.int64)


def bucket_bounds(idx: int) -> tuple[int, int]:
    """The smallest and largest value (us) that fall into bucket ``idx``."""
    if idx < _FULL:
        return idx, idx
    shift = idx // _HALF - 1
    mant = idx - shift * _HALF
    return mant << shift, ((mant + 1) << shift) - 1


@dataclass
class Histogram:
    """Bucket counts plus the exact extremes."""

    counts: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    max_us: int = 0
    min_us: int = 0

    @classmethod
    def from_seconds(cls, seconds: npt.NDArray[np.float64]) -> Histogram:
        if seconds.size == 0:
            return cls()
        us = np.rint(seconds * 1e6).astype(np.int64)
        return cls(np.bincount(bucket_index(us)), int(us.max()), int(us.min()))

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def merge(self, other: Histogram) -> Histogram:
        if other.total == 0:
            return Histogram(self.counts.copy(), self.max_us, self.min_us)
        if self.total == 0:
            return Histogram(other.counts.copy(), other.max_us, other.min_us)
        n = max(self.counts.size, other.counts.size)
        counts = np.zeros(n, np.int64)
        counts[: self.counts.size] += self.counts
        counts[: other.counts.size] += other.counts
        return Histogram(counts, max(self.max_us, other.max_us), min(self.min_us, other.min_us))

    def percentile_us(self, p: float) -> int | None:
        """The ``p``-th percentile in microseconds, or None without values."""
        total = self.total
        if total == 0:
            return None
        rank = max(1, int(np.ceil(p / 100.0 * total)))
        idx = int(np.searchsorted(np.cumsum(self.counts), rank))
        lo, hi = bucket_bounds(idx)
        return min(max((lo + hi) // 2, self.min_us), self.max_us)

    def summary_ms(self) -> dict[str, float | None]:
        """p50, p90, p99, p99.9 and max in milliseconds (None without values)."""
        out: dict[str, float | None] = {}
        for p in PERCENTILES:
            v = self.percentile_us(p)
            out[f"p{p:g}"] = None if v is None else v / 1000.0
        out["max"] = self.max_us / 1000.0 if self.total else None
        return out
