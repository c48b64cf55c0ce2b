"""Pieces of the drill on their own: targets, histogram, outcome classes, /proc."""

from __future__ import annotations

import os

import numpy as np
import pytest

from sdserve.drill.client import TargetError, parse_target
from sdserve.drill.histogram import Histogram, bucket_bounds, bucket_index
from sdserve.drill.outcome import EOF, REFUSED, RESET, TIMEOUT, WS_ECHO_OK, classify
from sdserve.drill.resources import children, descendants, sample


@pytest.mark.parametrize(
    ("url", "host", "port", "path"),
    [
        ("http://127.0.0.1:8080/", "127.0.0.1", 8080, "/"),
        ("http://localhost/slow?ms=5", "127.0.0.1", 80, "/slow?ms=5"),
        ("http://[::1]:81/x", "::1", 81, "/x"),
        ("ws://127.0.0.2:9/ws", "127.0.0.2", 9, "/ws"),
    ],
)
def test_loopback_targets(url: str, host: str, port: int, path: str) -> None:
    ep = parse_target(url)
    assert (ep.host, ep.port, ep.path) == (host, port, path)


@pytest.mark.parametrize(
    "url", ["http://192.168.1.1/", "http://example.org/", "http://[fe80::1]/", "ftp://127.0.0.1/"]
)
def test_other_targets_are_refused(url: str) -> None:
    with pytest.raises(TargetError):
        parse_target(url)


def test_classes() -> None:
    assert [classify(c) for c in (200, 204, 301, 101, WS_ECHO_OK)] == ["success"] * 5
    assert [classify(c) for c in (500, 503, 599)] == ["5xx"] * 3
    assert [classify(c) for c in (404, 429, 100)] == ["other_status"] * 3
    assert [classify(c) for c in (REFUSED, RESET, EOF, TIMEOUT, 5)] == [
        "refused",
        "reset",
        "eof",
        "timeout",
        "other_error",
    ]


def test_buckets_are_contiguous_and_tight() -> None:
    values = np.arange(0, 300_000, dtype=np.int64)
    idx = bucket_index(values)
    assert np.all(np.diff(idx) >= 0)
    assert np.all(np.diff(idx) <= 1)
    for i in np.unique(idx)[::97].tolist():
        lo, hi = bucket_bounds(i)
        members = values[idx == i]
        assert (int(members.min()), int(members.max())) == (lo, min(hi, 299_999))
        assert hi - lo <= max(lo / 64, 0)


def test_percentiles_match_exact_within_the_bucket_error() -> None:
    rng = np.random.default_rng(1)
    seconds = rng.lognormal(mean=-6, sigma=1.5, size=200_000)
    h = Histogram.from_seconds(seconds)
    assert h.total == seconds.size
    for p in (50, 90, 99, 99.9):
        exact = np.percentile(seconds * 1e6, p, method="inverted_cdf")
        got = h.percentile_us(p)
        assert got is not None
        assert abs(got - exact) <= exact / 64 + 1
    assert h.summary_ms()["max"] == pytest.approx(seconds.max() * 1e3, abs=1e-3)


def test_merge_equals_the_whole() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.exponential(0.01, 5000), rng.exponential(0.1, 7000)
    whole = Histogram.from_seconds(np.concatenate([a, b]))
    merged = Histogram.from_seconds(a).merge(Histogram.from_seconds(b))
    assert merged.summary_ms() == whole.summary_ms()
    assert Histogram().percentile_us(50) is None


def test_proc_tree_of_this_process() -> None:
    me = os.getpid()
    assert me in descendants(os.getppid())
    assert me in children(os.getppid())
    s = sample(me, 1.0)
    assert s.pid == me
    assert s.processes >= 1
    assert s.fds >= 3
    assert s.rss_bytes > 1_000_000
    assert sample(None, 0.0).processes == 0


def test_public_api() -> None:
    from sdserve import drill

    assert drill.__all__ == sorted(drill.__all__)
    for name in drill.__all__:
        assert hasattr(drill, name), name
