"""Compact labelled histograms and counters for llmpath's per-request observations (single-process mode).

prometheus-client keeps one locked value object per histogram bucket and per counter and scans the buckets
linearly; with 13 histogram observations and 4 counter increments per request that was most of llmpath's metric
cost. These collectors keep one list of counts per series (bucket found by bisection) and one float per counter
series, expose exactly what prometheus-client's ``Histogram``/``Counter`` expose (``_bucket``/``_count``/``_sum``/
``_created``, ``_total``/``_created``, exemplars in OpenMetrics), and let the families of one request share one
lock: :meth:`CompactFamilies.batch` takes it once and the children's ``add`` methods update without locking.
Requests' observations may also be deferred (:meth:`CompactFamilies.defer`): they are folded into the children a
few dozen requests at a time, which keeps the children hot in the CPU caches while they are updated, and before
any of the families is collected, so a scrape never misses a finished request.
In multiprocess mode llmpath uses prometheus-client's metrics instead, whose values live in the shared files.
"""

from __future__ import annotations

import logging
import math
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from time import time
from typing import Any, Generic, TypeVar

import prometheus_client.metrics as _pc_metrics
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar, Sample
from prometheus_client.utils import floatToGoString

logger = logging.getLogger("llmpath.instrumentation")


def _use_created() -> bool:
    """prometheus-client's ``disable_created_metrics()`` switch (``PROMETHEUS_DISABLE_CREATED_SERIES``)."""
    return bool(getattr(_pc_metrics, "_use_created", True))


#: An exemplar's labels and timestamp, made once per request and shared by its observations.
ExemplarTag = tuple[dict[str, str], float]


class HistogramChild:
    """One labelled histogram series: ``observe(value, exemplar=None)`` like prometheus-client's children, and
    ``add(value, tag=None)`` for callers that hold the family lock (see :meth:`CompactFamilies.batch`)."""

    __slots__ = ("_bounds", "_counts", "_exemplars", "_lock", "_sum", "created")

    def __init__(self, bounds: tuple[float, ...], lock: threading.Lock) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self._exemplars: list[tuple[ExemplarTag, float] | None] = [None] * (len(bounds) + 1)
        self._sum = 0.0
        self._lock = lock
        self.created = time()

    def add(self, amount: float, tag: ExemplarTag | None = None) -> None:
        """Count ``amount`` in its bucket (``le`` semantics) and add it to the sum; the caller holds the lock.
        With ``tag``, ``amount`` becomes the bucket's exemplar. A NaN is in the sum only (in no bucket, so not in the
        count), as prometheus-client's ``Histogram`` has it."""
        self._sum += amount
        if amount != amount:  # NaN: bisection would put it in the first bucket
            return
        i = bisect_left(self._bounds, amount)
        self._counts[i] += 1
        if tag is not None:
            self._exemplars[i] = (tag, amount)

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        """:meth:`add` under the lock (``exemplar``: its labels, e.g. ``{"trace_id": ...}``)."""
        with self._lock:
            self.add(amount, (exemplar, time()) if exemplar else None)

    def snapshot(self) -> tuple[list[int], float, list[Exemplar | None]]:
        """Counts per bucket (not cumulative), sum and exemplars, read consistently."""
        with self._lock:
            counts, total, tagged = list(self._counts), self._sum, list(self._exemplars)
        return counts, total, [None if t is None else Exemplar(t[0][0], t[1], t[0][1]) for t in tagged]


class CounterChild:
    """One labelled counter series: ``inc(amount=1)`` like prometheus-client's, ``add(amount)`` under the lock."""

    __slots__ = ("_lock", "created", "value")

    def __init__(self, lock: threading.Lock) -> None:
        self.value = 0.0
        self._lock = lock
        self.created = time()

    def add(self, amount: float) -> None:
        """Add ``amount`` (≥ 0); the caller holds the lock."""
        self.value += amount

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` (≥ 0) under the lock."""
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        with self._lock:
            self.value += amount


C = TypeVar("C", HistogramChild, CounterChild)


class _Family(Collector, Generic[C]):
    """A labelled family registered on a registry as a collector; children are created on first use."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], families: CompactFamilies) -> None:
        self.name: str = name
        self.documentation: str = documentation
        self.labelnames: tuple[str, ...] = tuple(labelnames)
        self._families: CompactFamilies = families
        self._lock: threading.Lock = families.lock  # the children's (shared) lock
        self._create_lock = threading.Lock()  # not the shared one: children are created inside a batch
        self._children: dict[tuple[str, ...], C] = {}

    def _new_child(self) -> C:
        raise NotImplementedError

    def labels(self, *values: str) -> C:
        """The child for these label values (in ``labelnames`` order), created on first use."""
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            if len(key) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected {len(self.labelnames)} label values, got {len(key)}")
            with self._create_lock:
                child = self._children.get(key)
                if child is None:
                    child = self._children[key] = self._new_child()
        return child


class CompactHistogram(_Family[HistogramChild]):
    """A histogram family with ``labels(*values)`` children (exposed like prometheus-client's ``Histogram``)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Iterable[float],
        families: CompactFamilies,
    ) -> None:
        super().__init__(name, documentation, labelnames, families)
        bounds = tuple(float(b) for b in buckets if not math.isinf(b))
        if not bounds or list(bounds) != sorted(set(bounds)):
            raise ValueError(f"{name}: buckets must be sorted, distinct and finite (+Inf is implied)")
        self._bounds = bounds
        self._le = (*(floatToGoString(b) for b in bounds), "+Inf")

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self._bounds, self._lock)

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[Metric]:
        self._families.flush()
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        created = _use_created()
        for labels, child in list(self._children.items()):
            counts, total, exemplars = child.snapshot()
            cumulative = 0
            buckets: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
            for le, n, exemplar in zip(self._le, counts, exemplars, strict=True):
                cumulative += n
                buckets.append((le, cumulative) if exemplar is None else (le, cumulative, exemplar))
            family.add_metric(labels, buckets, total)
            labelled = dict(zip(self.labelnames, labels, strict=True))
            if self._bounds[0] < 0:  # add_metric then leaves out _count and _sum; Histogram only _sum
                family.samples.append(Sample(f"{self.name}_count", labelled, float(cumulative)))
            if created:
                family.samples.append(Sample(f"{self.name}_created", labelled, child.created))
        yield family


class CompactCounter(_Family[CounterChild]):
    """A counter family with ``labels(*values)`` children (exposed like prometheus-client's ``Counter``)."""

    def _new_child(self) -> CounterChild:
        return CounterChild(self._lock)

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[Metric]:
        self._families.flush()
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        created = _use_created()
        with self._lock:
            values = [(labels, child.value, child.created) for labels, child in self._children.items()]
        for labels, value, since in values:
            family.add_metric(labels, value, since if created else None)
        yield family


#: Deferred observations folded at once (:meth:`CompactFamilies.defer`): enough to keep the children's data hot,
#: few enough that a scrape's fold is cheap (a few dozen requests' observations, well under a millisecond).
FOLD_EVERY = 32


class CompactFamilies:
    """Compact families on one registry sharing one lock, so that a request's observations take it once::

        with families.batch():
            duration_child.add(0.12)
            requests_child.add(1)

    or, given ``fold`` (which calls the children's ``add`` methods for a list of items, under the lock), deferred:
    ``families.defer(item)``.
    """

    def __init__(self, registry: CollectorRegistry | None, fold: Callable[[list[Any]], None] | None = None) -> None:
        self.registry = registry
        self.lock = threading.Lock()
        self._fold = fold
        self._pending: list[Any] = []

    def histogram(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Iterable[float]
    ) -> CompactHistogram:
        family = CompactHistogram(name, documentation, labelnames, buckets, self)
        if self.registry is not None:
            self.registry.register(family)
        return family

    def counter(self, name: str, documentation: str, labelnames: Sequence[str]) -> CompactCounter:
        family = CompactCounter(name.removesuffix("_total"), documentation, labelnames, self)
        if self.registry is not None:
            self.registry.register(family)
        return family

    def batch(self) -> threading.Lock:
        """The shared lock (a context manager): hold it while calling the children's ``add`` methods."""
        return self.lock

    def defer(self, item: Any) -> None:
        """Queue ``item`` for ``fold``; every :data:`FOLD_EVERY` items the queue is folded (and on :meth:`flush`)."""
        if self._fold is None:
            raise TypeError("CompactFamilies needs fold= to defer observations")
        with self.lock:
            pending = self._pending
            pending.append(item)
            if len(pending) >= FOLD_EVERY:
                self._fold_pending()

    def flush(self) -> None:
        """Fold what :meth:`defer` queued (every family's ``collect`` does it first). A failed fold is logged, not
        raised: the scrape goes on."""
        if self._pending:
            with self.lock:
                try:
                    self._fold_pending()
                except Exception:
                    logger.exception("llmpath: folding deferred metric observations failed")

    def _fold_pending(self) -> None:
        pending = self._pending
        if not pending or self._fold is None:
            return
        try:
            self._fold(pending)
        finally:
            pending.clear()  # a failure loses this batch's observations, not the next ones
