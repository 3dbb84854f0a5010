"""A compact labelled histogram for llmpath's per-request observations (single-process mode).

prometheus-client's ``Histogram`` keeps one locked value object per bucket and scans the buckets linearly; with
13 observations per request over 29 buckets that is most of llmpath's metric cost. This collector keeps one list
of counts per series, finds the bucket by bisection and exposes the same families (``_bucket``/``_count``/``_sum``,
exemplars in OpenMetrics) through the registry. In multiprocess mode llmpath uses prometheus-client's
``Histogram`` instead, whose values live in the shared files.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from time import time

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString


class HistogramChild:
    """One labelled series; ``observe(value, exemplar=None)`` like prometheus-client's children."""

    __slots__ = ("_bounds", "_counts", "_exemplars", "_lock", "_sum")

    def __init__(self, bounds: tuple[float, ...], lock: threading.Lock) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self._exemplars: list[Exemplar | None] = [None] * (len(bounds) + 1)
        self._sum = 0.0
        self._lock = lock

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        """Count ``amount`` in its bucket (``le`` semantics) and add it to the sum."""
        i = bisect_left(self._bounds, amount)
        with self._lock:
            self._counts[i] += 1
            self._sum += amount
        if exemplar:
            self._exemplars[i] = Exemplar(exemplar, amount, time())

    def snapshot(self) -> tuple[list[int], float, list[Exemplar | None]]:
        """Counts per bucket (not cumulative), sum and exemplars, read consistently."""
        with self._lock:
            return list(self._counts), self._sum, list(self._exemplars)


class CompactHistogram(Collector):
    """A histogram family with ``labels(*values)`` children, registered on ``registry`` as a collector."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Iterable[float],
        registry: CollectorRegistry | None,
    ) -> None:
        bounds = tuple(float(b) for b in buckets if not math.isinf(b))
        if not bounds or list(bounds) != sorted(set(bounds)):
            raise ValueError(f"{name}: buckets must be sorted, distinct and finite (+Inf is implied)")
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._bounds = bounds
        self._le = (*(floatToGoString(b) for b in bounds), "+Inf")
        self._children: dict[tuple[str, ...], HistogramChild] = {}
        self._lock = threading.Lock()
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str) -> HistogramChild:
        """The child for these label values (in ``labelnames`` order), created on first use."""
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            if len(key) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected {len(self.labelnames)} label values, got {len(key)}")
            with self._lock:
                child = self._children.setdefault(key, HistogramChild(self._bounds, threading.Lock()))
        return child

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, child in list(self._children.items()):
            counts, total, exemplars = child.snapshot()
            cumulative = 0
            buckets: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
            for le, n, exemplar in zip(self._le, counts, exemplars, strict=True):
                cumulative += n
                buckets.append((le, cumulative) if exemplar is None else (le, cumulative, exemplar))
            family.add_metric(labels, buckets, total)
        yield family
