"""llmpath's Prometheus metric families, created once per registry, with pre-bound label children.

Every observation of a request happens once, at its end (:meth:`PrometheusMetrics.observe_request`); label
children are cached per label combination, which the cardinality guard keeps bounded.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping, Sequence
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
    MetricSpec,
    StageGroup,
)
from llmpath.instrumentation.exposition import multiprocess_dir
from llmpath.instrumentation.guard import CardinalityGuard
from llmpath.instrumentation.histograms import CompactHistogram

Exemplar = dict[str, str] | None


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


class _RouteModel:
    """Pre-bound children of the ``{route, model}`` families."""

    __slots__ = ("codes", "duration", "tpot", "ttft")

    def __init__(self, fam: PrometheusMetrics, route: str, model: str) -> None:
        self.duration = fam.request_duration.labels(route, model)
        self.ttft = fam.ttft.labels(route, model)
        self.tpot = fam.tpot.labels(route, model)
        self.codes: dict[int, Any] = {}


class PrometheusMetrics:
    """The llmpath families on one registry; get it with :func:`metrics_for` (one instance per registry)."""

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
        self.requests = Counter(REQUESTS_TOTAL, _help(REQUESTS_TOTAL), _labels(REQUESTS_TOTAL), registry=reg)
        self.request_duration = self._histogram(REQUEST_DURATION, self.latency_buckets)
        self.stage_duration = self._histogram(STAGE_DURATION, self.latency_buckets)
        self.group_duration = self._histogram(STAGE_GROUP_DURATION, self.latency_buckets)
        self.ttft = self._histogram(TIME_TO_FIRST_TOKEN, self.latency_buckets)
        self.tpot = self._histogram(TIME_PER_OUTPUT_TOKEN, self.tpot_buckets)
        self.tokens = Counter(TOKENS_TOTAL, _help(TOKENS_TOTAL), _labels(TOKENS_TOTAL), registry=reg)
        self.overflow = Counter(
            LABEL_OVERFLOW_TOTAL, _help(LABEL_OVERFLOW_TOTAL), _labels(LABEL_OVERFLOW_TOTAL), registry=reg
        )
        self.groups = tuple(groups)
        self._rm: dict[tuple[str, str], _RouteModel] = {}
        self._stage: dict[str, dict[str, tuple[Any, tuple[int, ...]]]] = {}
        self._group: dict[str, tuple[Any, ...]] = {}
        self._tokens: dict[tuple[str, str, str], tuple[Any, Any, Any]] = {}
        self._extra: dict[str, MetricWrapperBase] = {}
        self._lock = threading.Lock()

    def _histogram(self, name: str, buckets: Sequence[float]) -> Histogram | CompactHistogram:
        if multiprocess_dir() is not None:  # values must live in prometheus-client's shared files
            return Histogram(name, _help(name), _labels(name), buckets=buckets, registry=self.registry)
        return CompactHistogram(name, _help(name), _labels(name), buckets, self.registry)

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

    def _route_model(self, route: str, model: str) -> _RouteModel:
        rm = self._rm.get((route, model))
        if rm is None:
            rm = self._rm[(route, model)] = _RouteModel(self, route, model)
        return rm

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
        stage_sums: Mapping[str, float],
        usage: Sequence[int] | None,
        exemplar: Exemplar,
    ) -> None:
        """All of a finished request's observations (label values pass the cardinality guard here)."""
        g_route = guard.admit("route", route)
        g_model = guard.admit("model", model)
        if g_route is OVERFLOW_LABEL_VALUE or g_model is OVERFLOW_LABEL_VALUE:
            self._count_overflow(g_route is OVERFLOW_LABEL_VALUE, g_model is OVERFLOW_LABEL_VALUE, ttft, tpot, usage)
            if g_route is OVERFLOW_LABEL_VALUE and stage_sums:
                self.overflow.labels(STAGE_DURATION, "route").inc()
        rm = self._rm.get((g_route, g_model))
        if rm is None:
            rm = self._rm[(g_route, g_model)] = _RouteModel(self, g_route, g_model)
        counter = rm.codes.get(code)
        if counter is None:
            counter = rm.codes[code] = self.requests.labels(g_route, g_model, str(code))
        counter.inc()
        rm.duration.observe(duration, exemplar)
        if ttft is not None:
            rm.ttft.observe(ttft, exemplar)
        if tpot is not None:
            rm.tpot.observe(tpot, exemplar)
        if stage_sums:
            self._observe_stages(guard, g_route, stage_sums, exemplar)
        if usage is not None:
            g_tenant = guard.admit("tenant", tenant or "unknown")
            if g_tenant is OVERFLOW_LABEL_VALUE:
                self.overflow.labels(TOKENS_TOTAL, "tenant").inc()
            key = (g_route, g_model, g_tenant)
            children = self._tokens.get(key)
            if children is None:
                children = self._tokens[key] = tuple(self.tokens.labels(*key, t) for t in TOKEN_TYPES)  # type: ignore[assignment]
            for child, n in zip(children, usage, strict=True):
                if n:
                    child.inc(n)

    def _observe_stages(
        self, guard: CardinalityGuard, route: str, stage_sums: Mapping[str, float], exemplar: Exemplar
    ) -> None:
        by_stage = self._stage.get(route)
        if by_stage is None:
            by_stage = self._stage[route] = {}
        totals: list[float] | None = None
        for name, seconds in stage_sums.items():
            bound = by_stage.get(name)
            if bound is None:
                bound = self._bind_stage(guard, route, name, by_stage)
            bound[0].observe(seconds, exemplar)
            if bound[1]:
                if totals is None:
                    totals = [0.0] * len(self.groups)
                for i in bound[1]:
                    totals[i] += seconds
        if totals is not None:
            children = self._group.get(route)
            if children is None:
                children = self._group[route] = tuple(self.group_duration.labels(g.name, route) for g in self.groups)
            for child, seconds, group in zip(children, totals, self.groups, strict=True):
                if seconds or any(st in stage_sums for st in group.stages):
                    child.observe(seconds, exemplar)

    def _bind_stage(
        self, guard: CardinalityGuard, route: str, name: str, by_stage: dict[str, tuple[Any, tuple[int, ...]]]
    ) -> tuple[Any, tuple[int, ...]]:
        g_name = guard.admit("stage", name)
        groups = tuple(i for i, g in enumerate(self.groups) if name in g.stages)
        bound = (self.stage_duration.labels(g_name, route), groups)
        if g_name is OVERFLOW_LABEL_VALUE:
            self.overflow.labels(STAGE_DURATION, "stage").inc()  # not cached: counted on every observation
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
