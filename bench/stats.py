"""Latency samples -> percentiles, throughput and ratios. Pure Python, no timing here."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be between 0 and 100, got {q}")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def median(values: list[float]) -> float:
    """The 50th :func:`percentile`."""
    return percentile(values, 50)


@dataclass(frozen=True)
class LatencySummary:
    """Milliseconds per request of one measured configuration; ``throughput`` in images per second."""

    n: int
    p50: float
    p95: float
    p99: float
    mean: float
    throughput: float | None = None  # n / wall time, when the samples ran concurrently over a known wall time

    def as_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def summarize(latencies_ms: list[float], wall_s: float | None = None) -> LatencySummary:
    """Percentiles of ``latencies_ms``; throughput = count / ``wall_s`` when given, else 1000 / mean (sequential)."""
    if not latencies_ms:
        raise ValueError("no latency samples")
    mean = sum(latencies_ms) / len(latencies_ms)
    if wall_s is not None:
        if wall_s <= 0:
            raise ValueError(f"wall time must be positive, got {wall_s}")
        throughput = len(latencies_ms) / wall_s
    else:
        throughput = 1000.0 / mean if mean > 0 else None
    return LatencySummary(
        n=len(latencies_ms),
        p50=percentile(latencies_ms, 50),
        p95=percentile(latencies_ms, 95),
        p99=percentile(latencies_ms, 99),
        mean=mean,
        throughput=throughput,
    )


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is missing or ``b`` is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b
