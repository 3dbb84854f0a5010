"""The engine's Prometheus metrics: SGLang 0.5.x names, labels and default buckets, taken from the stage catalog
(``SGLANG_METRICS``) so dashboards and the engine can never disagree on a name."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from llmpath.instrumentation.catalog import SGLANG_METRICS, MetricSpec

_TTFT = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400)
_ITL = (0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.06, 0.08, 0.1, 0.2, 0.4, 0.6, 0.8,
        1, 2, 4, 6, 8)  # fmt: skip
_E2E = (*_TTFT, 600, 1200, 1800, 2400)
_QUEUE = (0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.2, 0.5, 1, 2, 3, 4, 5, 10, 15, 20, 30, *range(40, 101, 10),
          *range(200, 1001, 100), 1200, 1400, 1600, 1800, 2000, 2500, 3000)  # fmt: skip
_PER_STAGE = tuple(0.001 * 1.62**i for i in range(30))

#: SGLang's default buckets per histogram (sglang.md §5.1).
DEFAULT_BUCKETS: dict[str, tuple[float, ...]] = {
    "sglang:time_to_first_token_seconds": _TTFT,
    "sglang:inter_token_latency_seconds": _ITL,
    "sglang:e2e_request_latency_seconds": _E2E,
    "sglang:queue_time_seconds": _QUEUE,
    "sglang:per_stage_req_latency_seconds": _PER_STAGE,
}


class EngineMetrics:
    """Every ``SGLANG_METRICS`` family in a private registry, with the base labels already bound."""

    #: Values of the extra labels the engine uses; every series is created at start with value 0, so that the
    #: families have samples before traffic (sglang-router's /engine_metrics cannot merge empty families).
    _EXTRA_VALUES: dict[str, tuple[str, ...]] = {
        "is_streaming": ("false", "true"),
        "cache_source": ("device",),
        "stage": ("prefill_forward", "chunked_prefill"),
    }

    def __init__(self, model_name: str, buckets: dict[str, tuple[float, ...]] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.base = {"model_name": model_name, "engine_type": "unified", "tp_rank": "0", "pp_rank": "0",
                     "moe_ep_rank": "0", "dp_rank": "0", "cache_type": "RadixCache"}  # fmt: skip
        chosen = {**DEFAULT_BUCKETS, **(buckets or {})}
        self._families: dict[str, Counter | Gauge | Histogram] = {}
        for spec in SGLANG_METRICS:
            self._families[spec.name] = self._make(spec, chosen)
        for name, family in self._families.items():
            combos: list[dict[str, str]] = [{}]
            for key in (k for k in family._labelnames if k not in self.base):  # noqa: SLF001
                combos = [{**c, key: v} for c in combos for v in self._EXTRA_VALUES[key]]
            for combo in combos:
                self._child(name, **combo)

    def _make(self, spec: MetricSpec, buckets: dict[str, tuple[float, ...]]) -> Counter | Gauge | Histogram:
        name, doc, labels, registry = spec.name, spec.help, spec.labels, self.registry
        if spec.kind == "counter":
            return Counter(name, doc, labels, registry=registry)
        if spec.kind == "gauge":
            return Gauge(name, doc, labels, registry=registry)
        return Histogram(name, doc, labels, registry=registry, buckets=buckets[spec.name])

    def _child(self, name: str, **extra: str) -> Counter | Gauge | Histogram:
        family = self._families[name]
        labels = {k: self.base[k] for k in family._labelnames if k in self.base}  # noqa: SLF001
        return family.labels(**labels, **extra)

    def observe(self, name: str, value: float, **extra: str) -> None:
        self._child(name, **extra).observe(value)  # type: ignore[union-attr]

    def inc(self, name: str, value: float = 1.0, **extra: str) -> None:
        if value:
            self._child(name, **extra).inc(value)  # type: ignore[union-attr]

    def set(self, name: str, value: float) -> None:
        self._child(name).set(value)  # type: ignore[union-attr]

    def render(self) -> bytes:
        """The Prometheus text exposition of the registry."""
        return generate_latest(self.registry)


def parse_buckets(rule: list[str], default: tuple[float, ...]) -> tuple[float, ...]:
    """SGLang's bucket rules: ``default``; ``tse <middle> <base> <count>``; ``custom v1 v2 …``."""
    if not rule or rule == ["default"]:
        return default
    kind, *args = rule
    try:
        values = [float(a) for a in args]
    except ValueError:
        raise ValueError(f"bucket rule {' '.join(rule)!r}: values must be numbers") from None
    if kind == "custom" and values:
        return tuple(sorted(set(values)))
    if kind == "tse" and len(values) == 3 and values[2] >= 1:
        # SGLang's two_sides_exponential_buckets: ceil(count / 2) steps of base**i on each side of the middle, the
        # lower ones clamped at 0.
        middle, base, count = values
        if base <= 1:
            raise ValueError(f"bucket rule {' '.join(rule)!r}: the base must be greater than 1")
        steps = range(1, math.ceil(int(count) / 2) + 1)
        out = {middle} | {middle + base**i for i in steps} | {max(0.0, middle - base**i) for i in steps}
        return tuple(sorted(out))
    raise ValueError(f"bucket rule {' '.join(rule)!r}: expected 'default', 'tse MIDDLE BASE COUNT' or 'custom V …'")
