"""llmpath's Prometheus metric families, created once per registry, with pre-bound label children.

Every observation of a request happens once, at its end (:meth:`PrometheusMetrics.observe_request`); label
children are cached per label combination, which the cardinality guard keeps bounded.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from llmpath.instrumentation.catalog import (
    LABEL_OVERFLOW_TOTAL,
    LATENCY_BUCKETS,
    METRICS_BY_NAME,
    OVERFLOW_LABEL_VALUE,
    REQUEST_DURATION,
    REQUESTS_TOTAL,
    STAGE_DURATION,
    STAGE_GROUP_DURATION,
    STAGE_GROUPS,
    TIME_PER_OUTPUT_TOKEN,
    TIME_TO_FIRST_TOKEN,
    TOKEN_TYPES,
    TOKENS_TOTAL,
    TPOT_BUCKETS,
    UNATTRIBUTED,
    UNKNOWN_LABEL_VALUE,
    USAGE_RECORD_FAILURES_TOTAL,
    MetricSpec,
    StageGroup,
)
from llmpath.instrumentation.compact import CompactCounter, CompactFamilies, CompactHistogram, ExemplarTag
from llmpath.instrumentation.exposition import multiprocess_dir
from llmpath.instrumentation.guard import CardinalityGuard

Exemplar = ExemplarTag | None
#: One finished request's observations, as :meth:`PrometheusMetrics.observe_request` defers them: the guard, the
#: requests counter's child, the ``{route, model}`` children, duration, TTFT, TPOT, the stage intervals, the
#: unattributed time, the token counters' children with the counts, and the exemplar.
_Observations = tuple[
    CardinalityGuard,
    Any,
    "_RouteModel",
    float,
    float | None,
    float | None,
    Sequence[tuple[str, float, float, str]],
    float | None,
    Any,
    Exemplar,
]


def _help(name: str) -> str:
    return METRICS_BY_NAME[name].help


def _labels(name: str) -> tuple[str, ...]:
    return METRICS_BY_NAME[name].labels


def create_metric(spec: MetricSpec, registry: CollectorRegistry | None, **kwargs: Any) -> MetricWrapperBase:
    """A prometheus-client metric for a catalog entry (gauges get the spec's ``multiprocess_mode`` hint)."""
    if spec.kind == "counter":
        return Counter(spec.name, spec.help, spec.labels, registry=registry, **kwargs)
    if spec.kind == "gauge":
        kwargs.setdefault("multiprocess_mode", spec.extra.get("multiprocess_mode", "all"))
        return Gauge(spec.name, spec.help, spec.labels, registry=registry, **kwargs)
    if spec.kind == "histogram":
        kwargs.setdefault("buckets", LATENCY_BUCKETS)
        return Histogram(spec.name, spec.help, spec.labels, registry=registry, **kwargs)
    raise ValueError(f"unsupported metric kind {spec.kind!r} for {spec.name}")


class _Unlocked:
    """A prometheus-client child behind the compact ``add`` interface (multiprocess mode, where values live in
    prometheus-client's files and lock themselves)."""

    __slots__ = ("add",)

    def __init__(self, add: Any) -> None:
        self.add = add


class _RouteModel:
    """Pre-bound children of an admitted ``{route, model}`` pair, and its per-stage and per-tenant children."""

    __slots__ = ("codes", "duration", "model", "route", "stages", "tenants", "tpot", "ttft")

    def __init__(self, fam: PrometheusMetrics, route: str, model: str) -> None:
        self.route = route
        self.model = model
        self.duration = fam.bind(fam.request_duration, route, model)
        self.ttft = fam.bind(fam.ttft, route, model)
        self.tpot = fam.bind(fam.tpot, route, model)
        self.codes: dict[int, Any] = {}
        #: stage name → (child, indexes of its stage groups); shared by every model of the route.
        self.stages = fam.stage_children(route)
        #: tenant → children of the three token types.
        self.tenants: dict[str, tuple[Any, Any, Any]] = {}


class PrometheusMetrics:
    """The llmpath families on one registry; get it with :func:`metrics_for` (one instance per registry).

    In single-process mode the per-request families are compact collectors sharing one lock, taken once per
    request (:mod:`llmpath.instrumentation.compact`); in multiprocess mode they are prometheus-client's.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        latency_buckets: Sequence[float] = LATENCY_BUCKETS,
        tpot_buckets: Sequence[float] = TPOT_BUCKETS,
        groups: Sequence[StageGroup] = STAGE_GROUPS,
    ) -> None:
        self.registry = registry
        self.latency_buckets = tuple(latency_buckets)
        self.tpot_buckets = tuple(tpot_buckets)
        reg = registry
        self._compact = CompactFamilies(reg, fold=self._fold) if multiprocess_dir() is None else None
        self.requests = self._counter(REQUESTS_TOTAL)
        self.request_duration = self._histogram(REQUEST_DURATION, self.latency_buckets)
        self.stage_duration = self._histogram(STAGE_DURATION, self.latency_buckets)
        self.group_duration = self._histogram(STAGE_GROUP_DURATION, self.latency_buckets)
        self.ttft = self._histogram(TIME_TO_FIRST_TOKEN, self.latency_buckets)
        self.tpot = self._histogram(TIME_PER_OUTPUT_TOKEN, self.tpot_buckets)
        self.tokens = self._counter(TOKENS_TOTAL)
        #: Compact too (single-process mode): collecting it folds the deferred requests first, whose fold counts the
        #: overflow of stage names and of stage groups' routes, so a scrape of this family alone is current.
        self.overflow = self._counter(LABEL_OVERFLOW_TOTAL)
        self.usage_failures = Counter(
            USAGE_RECORD_FAILURES_TOTAL,
            _help(USAGE_RECORD_FAILURES_TOTAL),
            _labels(USAGE_RECORD_FAILURES_TOTAL),
            registry=reg,
        )
        self.groups = tuple(groups)
        self._rm: dict[tuple[str, str], _RouteModel] = {}
        self._stage: dict[str, dict[str, tuple[Any, tuple[int, ...]]]] = {}
        self._group: dict[str, tuple[Any, ...]] = {}
        self._extra: dict[str, MetricWrapperBase] = {}
        self._lock = threading.Lock()

    def _histogram(self, name: str, buckets: Sequence[float]) -> Histogram | CompactHistogram:
        if self._compact is None:  # multiprocess: values must live in prometheus-client's shared files
            return Histogram(name, _help(name), _labels(name), buckets=buckets, registry=self.registry)
        return self._compact.histogram(name, _help(name), _labels(name), buckets)

    def _counter(self, name: str) -> Counter | CompactCounter:
        if self._compact is None:
            return Counter(name, _help(name), _labels(name), registry=self.registry)
        return self._compact.counter(name, _help(name), _labels(name))

    def bind(self, family: Any, *labels: str) -> Any:
        """The child of ``family`` for ``labels`` with an ``add`` method (call it inside :meth:`batch`)."""
        child = family.labels(*labels)
        if self._compact is not None:
            return child
        return _Unlocked(child.observe if isinstance(family, Histogram) else child.inc)  # no exemplars there

    # ---- gateway (and other) catalog metrics on the same registry ----------------------------

    def metric(self, name: str, **kwargs: Any) -> MetricWrapperBase:
        """The metric for catalog entry ``name`` on this registry, created on first use (e.g. the gateway's
        ``llmpath_prompt_cache_lookups_total``). Extra keyword arguments go to prometheus-client."""
        found = self._extra.get(name)
        if found is not None:
            return found
        with self._lock:
            found = self._extra.get(name)
            if found is None:
                spec = METRICS_BY_NAME.get(name)
                if spec is None:
                    raise KeyError(f"{name!r} is not in the catalog (llmpath.instrumentation.catalog.METRICS)")
                found = self._extra[name] = create_metric(spec, self.registry, **kwargs)
        return found

    # ---- per-request observation --------------------------------------------------------------

    def observe_request(
        self,
        guard: CardinalityGuard,
        route: str,
        model: str,
        tenant: str | None,
        code: int,
        duration: float,
        ttft: float | None,
        tpot: float | None,
        stages: Sequence[tuple[str, float, float, str]],
        unattributed: float | None,
        usage: Sequence[int] | None,
        exemplar: Exemplar,
    ) -> None:
        """All of a finished request's observations (label values pass the cardinality guard here). In
        single-process mode they are deferred: folded a few dozen requests at a time, and before any scrape
        (:meth:`~llmpath.instrumentation.compact.CompactFamilies.defer`)."""
        rm = self._rm.get((route, model))
        if rm is None:
            rm = self._admit(guard, route, model, ttft, tpot, bool(stages) or unattributed is not None, usage)
        tokens = None
        if usage is not None:
            tenant = tenant or UNKNOWN_LABEL_VALUE
            children = rm.tenants.get(tenant)
            if children is None:
                children = self._admit_tenant(guard, rm, tenant)
            tokens = (children, tuple(usage))  # the counts now: a later record_usage() is in no record
        counter = rm.codes.get(code)
        if counter is None:
            counter = rm.codes[code] = self.bind(self.requests, rm.route, rm.model, str(code))
        observations = (guard, counter, rm, duration, ttft, tpot, stages, unattributed, tokens, exemplar)
        if self._compact is not None:
            self._compact.defer(observations)
        else:  # multiprocess: another process reads the values at once
            self._fold([observations])

    def _fold(self, requests: list[_Observations]) -> None:
        """Add finished requests' observations to their children (under the compact families' lock)."""
        for guard, counter, rm, duration, ttft, tpot, stages, unattributed, tokens, exemplar in requests:
            counter.add(1)
            rm.duration.add(duration, exemplar)
            if ttft is not None:
                rm.ttft.add(ttft, exemplar)
            if tpot is not None:
                rm.tpot.add(tpot, exemplar)
            if stages or unattributed is not None:
                sums: dict[str, float] = {}
                get = sums.get
                for name, s, e, _ in stages:  # a stage run several times is one observation of its total
                    sums[name] = get(name, 0.0) + (e - s)
                if unattributed is not None:
                    sums[UNATTRIBUTED] = unattributed
                self._observe_stages(guard, rm, sums, exemplar)
            if tokens is not None:
                for child, n in zip(*tokens, strict=True):
                    if n:
                        child.add(n)

    def _admit(
        self,
        guard: CardinalityGuard,
        route: str,
        model: str,
        ttft: float | None,
        tpot: float | None,
        stages: bool,
        usage: Sequence[int] | None,
    ) -> _RouteModel:
        """The children of a ``{route, model}`` pair not seen yet, or of one with an overflowed label (those are
        not cached under the raw values, which are unbounded, and their overflow is counted on every request)."""
        g_route = guard.admit("route", route)
        g_model = guard.admit("model", model)
        rm = self._rm.get((g_route, g_model))
        if rm is None:
            rm = self._rm[(g_route, g_model)] = _RouteModel(self, g_route, g_model)
        if g_route is OVERFLOW_LABEL_VALUE or g_model is OVERFLOW_LABEL_VALUE:
            self._count_overflow(g_route is OVERFLOW_LABEL_VALUE, g_model is OVERFLOW_LABEL_VALUE, ttft, tpot, usage)
            if g_route is OVERFLOW_LABEL_VALUE and stages:
                self.overflow.labels(STAGE_DURATION, "route").inc()
        return rm

    def _admit_tenant(self, guard: CardinalityGuard, rm: _RouteModel, tenant: str) -> tuple[Any, Any, Any]:
        g_tenant = guard.admit("tenant", tenant)
        children = tuple(self.bind(self.tokens, rm.route, rm.model, g_tenant, t) for t in TOKEN_TYPES)
        if g_tenant is OVERFLOW_LABEL_VALUE:
            self.overflow.labels(TOKENS_TOTAL, "tenant").inc()  # counted on every request: not cached
        else:
            rm.tenants[tenant] = children
        return children

    def join_groups(self, groups: Sequence[StageGroup]) -> None:
        """Count the members of a catalog's ``groups`` (custom stages added to a built-in group) in their group's
        duration. One registry's groups hold the members of every catalog instrumented on it."""
        merged, changed = [], False
        for group in self.groups:
            other = next((g for g in groups if g.name == group.name), None)
            extra = [] if other is None else [st for st in other.stages if st not in group.stages]
            if extra:
                group, changed = replace(group, stages=(*group.stages, *extra)), True
            merged.append(group)
        if changed:
            with self._lock:
                self.groups = tuple(merged)
                for by_stage in self._stage.values():
                    by_stage.clear()  # cached group indexes of stages

    def stage_children(self, route: str) -> dict[str, tuple[Any, tuple[int, ...]]]:
        """stage name → (child of ``llmpath_stage_duration_seconds{stage, route}``, its group indexes)."""
        by_stage = self._stage.get(route)
        if by_stage is None:
            by_stage = self._stage[route] = {}
        return by_stage

    def _observe_stages(
        self, guard: CardinalityGuard, rm: _RouteModel, stage_sums: Mapping[str, float], exemplar: Exemplar
    ) -> None:
        by_stage = rm.stages
        route = rm.route
        totals: list[float | None] | None = None  # per group: None while none of its stages ran
        for name, seconds in stage_sums.items():
            bound = by_stage.get(name)
            if bound is None:
                bound = self._bind_stage(guard, route, name, by_stage)
            bound[0].add(seconds, exemplar)
            if bound[1]:
                if totals is None:
                    totals = [None] * len(self.groups)
                for i in bound[1]:
                    total = totals[i]
                    totals[i] = seconds if total is None else total + seconds
        if totals is not None:
            if route is OVERFLOW_LABEL_VALUE:
                self.bind(self.overflow, STAGE_GROUP_DURATION, "route").add(1)  # in the fold: the lock is held
            children = self._group.get(route)
            if children is None:
                children = self._group[route] = tuple(
                    self.bind(self.group_duration, g.name, route) for g in self.groups
                )
            for child, total in zip(children, totals, strict=True):
                if total is not None:
                    child.add(total, exemplar)

    def _bind_stage(
        self, guard: CardinalityGuard, route: str, name: str, by_stage: dict[str, tuple[Any, tuple[int, ...]]]
    ) -> tuple[Any, tuple[int, ...]]:
        g_name = guard.admit("stage", name)
        groups = tuple(i for i, g in enumerate(self.groups) if name in g.stages)
        bound = (self.bind(self.stage_duration, g_name, route), groups)
        if g_name is OVERFLOW_LABEL_VALUE:
            self.bind(self.overflow, STAGE_DURATION, "stage").add(1)  # not cached: counted on every observation
        else:
            by_stage[name] = bound
        return bound

    def _count_overflow(
        self, route: bool, model: bool, ttft: float | None, tpot: float | None, usage: Sequence[int] | None
    ) -> None:
        families = [REQUESTS_TOTAL, REQUEST_DURATION]
        if ttft is not None:
            families.append(TIME_TO_FIRST_TOKEN)
        if tpot is not None:
            families.append(TIME_PER_OUTPUT_TOKEN)
        if usage is not None:
            families.append(TOKENS_TOTAL)
        for label, hit in (("route", route), ("model", model)):
            if hit:
                for family in families:
                    self.overflow.labels(family, label).inc()


_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, PrometheusMetrics] = weakref.WeakKeyDictionary()
_BY_REGISTRY_LOCK = threading.Lock()


def metrics_for(
    registry: CollectorRegistry | None = None,
    *,
    latency_buckets: Sequence[float] = LATENCY_BUCKETS,
    tpot_buckets: Sequence[float] = TPOT_BUCKETS,
) -> PrometheusMetrics:
    """The llmpath families on ``registry`` (default: prometheus-client's global ``REGISTRY``), created once.

    Instrumenting several apps on one registry shares the families instead of failing on duplicates.
    """
    reg = REGISTRY if registry is None else registry
    with _BY_REGISTRY_LOCK:
        fam = _BY_REGISTRY.get(reg)
        if fam is None:
            fam = _BY_REGISTRY[reg] = PrometheusMetrics(reg, latency_buckets=latency_buckets, tpot_buckets=tpot_buckets)
        elif fam.latency_buckets != tuple(latency_buckets) or fam.tpot_buckets != tuple(tpot_buckets):
            raise ValueError("this registry already has llmpath metrics with other buckets")
    return fam
