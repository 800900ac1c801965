"""Counting shared by both sides: a histogram of plain integers, updated with
no lock and no label lookup, and the Prometheus metric families built from
it (and from counters by reason) at scrape time.

prometheus-client is imported only when a family is built: a process that
never serves ``/metrics`` never loads it.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

__all__ = [
    "DURATION_BUCKETS",
    "RTT_BUCKETS",
    "Histogram",
    "by_reason_family",
    "histogram_family",
]

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds (s) of request duration and latency histograms (then +Inf)."""
RTT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Upper bounds (s) of heartbeat RTT and connect time histograms (then +Inf)."""


class Histogram:
    """Counts of observations at or below each bound (then one above all), and
    their sum: what a Prometheus histogram exposes, cumulated at scrape time."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        """Observations so far."""
        return sum(self.counts)


def histogram_family(name: str, doc: str, histogram: Histogram) -> HistogramMetricFamily:
    """``histogram`` as a Prometheus histogram (cumulative buckets)."""
    from prometheus_client.core import HistogramMetricFamily

    buckets: list[tuple[str, float]] = []
    total = 0
    for bound, count in zip(histogram.bounds, histogram.counts, strict=False):
        total += count
        buckets.append((repr(float(bound)), total))
    total += histogram.counts[-1]
    buckets.append(("+Inf", total))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=histogram.sum)


def by_reason_family(name: str, doc: str, counts: dict[str, int]) -> CounterMetricFamily:
    """A counter with one ``reason`` label per key of ``counts``."""
    from prometheus_client.core import CounterMetricFamily

    family = CounterMetricFamily(name, doc, labels=["reason"])
    for reason, count in sorted(counts.items()):
        family.add_metric([reason], count)
    return family
