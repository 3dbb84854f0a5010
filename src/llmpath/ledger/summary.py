"""Aggregates over usage records: where the time goes per stage, TTFT, prompt-cache hit rate per route, tokens per
tenant; the slowest requests; one request by id."""

from __future__ import annotations

import heapq
import math
import re
import statistics
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from llmpath.instrumentation import STAGES, UNATTRIBUTED
from llmpath.instrumentation.catalog import TOKEN_TYPES, StageCatalog
from llmpath.instrumentation.usage import UsageRecord
from llmpath.ledger.prices import Prices

#: The owner shown for a stage the ledger has and the stage catalog lacks.
UNKNOWN_OWNER = "unknown"


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) by linear interpolation; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class StageRow:
    stage: str
    owner: str
    p50_s: float
    p95_s: float
    mean_s: float
    #: Mean time in this stage as a share of mean TTFT (None for stages after the first token).
    ttft_share: float | None


@dataclass
class RouteRow:
    """Latency and errors of one route (TTFT over the requests that got a first token)."""

    route: str
    requests: int
    server_errors: int
    client_errors: int
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    duration_p50_s: float


@dataclass
class TenantRow:
    """One tenant's requests: how many, how many were throttled (429: its request rate, its token budget or a
    full gateway) or failed (5xx), and its tokens by type."""

    tenant: str
    requests: int
    throttled: int
    server_errors: int
    tokens: dict[str, int]
    #: The output tokens that were a reasoning model's thinking (the records' ``extra.reasoning_tokens``).
    reasoning_tokens: int = 0


@dataclass
class CacheRow:
    route: str
    requests: int
    input_tokens: int
    cached_tokens: int
    predicted_tokens: int

    @property
    def actual_hit_rate(self) -> float:
        return self.cached_tokens / self.input_tokens if self.input_tokens else 0.0

    @property
    def predicted_hit_rate(self) -> float:
        return self.predicted_tokens / self.input_tokens if self.input_tokens else 0.0


@dataclass
class CostRow:
    """What one tenant's, route's or model's requests cost, and what the prompt cache saved them."""

    name: str
    requests: int = 0
    cost: float = 0.0
    cache_saving: float = 0.0


@dataclass
class CostSummary:
    """Cost from the token counts and a price file (:mod:`llmpath.ledger.prices`)."""

    currency: str
    total: float
    #: What serving cached prompt tokens saved against the full input price.
    cache_saving: float
    by_tenant: list[CostRow]
    by_route: list[CostRow]
    by_model: list[CostRow]
    #: Models without a price (and no ``*`` entry) → their requests, left out of the figures.
    unpriced: dict[str, int] = field(default_factory=dict)


@dataclass
class LedgerSummary:
    """The figures of :func:`summarize`. TTFT, the stages and the prompt cache cover the requests that got a first
    token, whatever their final status (like ``llmpath_time_to_first_token_seconds``); ``None`` without any."""

    requests: int
    #: Requests answered 5xx (the server's failures; 4xx are the clients').
    errors: int
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    stages: list[StageRow]
    cache: list[CacheRow]
    tokens: dict[str, int]
    tokens_by_tenant: dict[str, dict[str, int]] = field(default_factory=dict)
    tenants: list[TenantRow] = field(default_factory=list)
    ttft_p99_s: float | None = None
    routes: list[RouteRow] = field(default_factory=list)
    #: Requests per HTTP status code.
    statuses: dict[int, int] = field(default_factory=dict)
    #: First and last request start (epoch seconds; 0 without records).
    first_time: float = 0.0
    last_time: float = 0.0
    #: With a price file: cost and cache savings.
    cost: CostSummary | None = None
    #: Of ``tokens["output"]``, those that were a reasoning model's thinking (``extra.reasoning_tokens``).
    reasoning_tokens: int = 0


def stage_totals(record: UsageRecord) -> dict[str, float]:
    """Seconds per stage for one request (a stage that ran twice, e.g. gateway + backend queue, is summed)."""
    totals: dict[str, float] = defaultdict(float)
    for st in record.stages:
        totals[st.name] += st.duration_s
    if record.unattributed_s is not None:
        totals[UNATTRIBUTED] += record.unattributed_s
    return totals


def reasoning_tokens(record: UsageRecord) -> int:
    """The request's output tokens that were thinking (``extra.reasoning_tokens``, which the gateway writes for a
    reasoning model); 0 without one, or with a value that is not a count (a ledger written by other code)."""
    value = record.extra.get("reasoning_tokens")
    return value if type(value) is int and value > 0 else 0


def untracked_s(record: UsageRecord) -> float:
    """Seconds of the request's duration in no stage and not in ``unattributed`` (so its stage totals,
    ``unattributed`` and this add up to the duration when stages do not overlap): the time after the first token
    outside ``decode``, or, without a first token, all the time outside the stages."""
    spans = sorted((max(s.start_s, 0.0), min(s.start_s + s.duration_s, record.duration_s)) for s in record.stages)
    covered, reach = 0.0, 0.0
    for start, end in spans:
        if end > max(start, reach):
            covered += end - max(start, reach)
            reach = end
    return max(record.duration_s - covered - (record.unattributed_s or 0.0), 0.0)


def summarize(
    records: Iterable[UsageRecord], catalog: StageCatalog = STAGES, prices: Prices | None = None
) -> LedgerSummary:
    """Aggregate ledger records into the report's figures.

    TTFT (overall and per route), the stages and the prompt cache cover every request that got a first token,
    whatever its final status (a stream cut off after its first token counts; a 429 or a 500 before it does not),
    the rule of the ``llmpath_time_to_first_token_seconds`` histogram. One pass that keeps numbers, not records, so
    a ledger of millions of requests fits in memory. Stages come in ``catalog`` order with its owners, those no
    such request has left out; a stage the records have and the catalog lacks follows them (owner ``unknown``;
    counted as before the first token when it always ended before it), so no time goes missing.
    With ``prices``, every request's tokens are priced (failed requests too: their tokens were processed).
    """
    acc = _Accumulator(catalog, prices)
    for r in records:
        acc.add(r)
    return acc.result()


class _Costs:
    """The running cost figures of :func:`summarize`."""

    def __init__(self, prices: Prices) -> None:
        self.prices = prices
        self.rows: dict[str, dict[str, CostRow]] = {"tenant": {}, "route": {}, "model": {}}
        self.unpriced: Counter[str] = Counter()

    def add(self, r: UsageRecord) -> None:
        price = self.prices.of(r.model)
        if price is None:
            self.unpriced[r.model] += 1
            return
        cost = price.cost(r.input_tokens, r.cached_tokens, r.output_tokens)
        saving = price.cache_saving(r.cached_tokens)
        for kind, name in (("tenant", r.tenant or "-"), ("route", r.route), ("model", r.model)):
            row = self.rows[kind].get(name)
            if row is None:
                row = self.rows[kind][name] = CostRow(name)
            row.requests += 1
            row.cost += cost
            row.cache_saving += saving

    def result(self) -> CostSummary:
        def ordered(kind: str) -> list[CostRow]:
            return sorted(self.rows[kind].values(), key=lambda row: (-row.cost, row.name))

        models = self.rows["model"].values()
        return CostSummary(
            currency=self.prices.currency,
            total=sum(row.cost for row in models),
            cache_saving=sum(row.cache_saving for row in models),
            by_tenant=ordered("tenant"),
            by_route=ordered("route"),
            by_model=ordered("model"),
            unpriced=dict(sorted(self.unpriced.items())),
        )


class _RouteFigures:
    __slots__ = ("client_errors", "durations", "requests", "server_errors", "ttfts")

    def __init__(self) -> None:
        self.requests = self.server_errors = self.client_errors = 0
        self.ttfts = array("d")
        self.durations = array("d")


class _Accumulator:
    """The running figures of :func:`summarize`."""

    def __init__(self, catalog: StageCatalog, prices: Prices | None) -> None:
        self.catalog = catalog
        self.costs = _Costs(prices) if prices is not None else None
        #: TTFT of each request with a first token, in order; the per-stage arrays have one value per entry.
        self.ttfts = array("d")
        names = catalog.names_with_unattributed
        self.per_stage: dict[str, array[float]] = {name: array("d") for name in names}
        self.before_first = {name: name == UNATTRIBUTED or catalog[name].before_first_token for name in names}
        #: The stages those requests have (the others are left out of the report).
        self.observed: set[str] = set()
        self.cache: dict[str, CacheRow] = {}
        self.routes: dict[str, _RouteFigures] = defaultdict(_RouteFigures)
        self.tenants: dict[str, TenantRow] = {}
        self.statuses: Counter[int] = Counter()
        self.first_time = math.inf
        self.last_time = -math.inf

    def add(self, r: UsageRecord) -> None:
        code = r.status_code
        self.statuses[code] += 1
        self.first_time = min(self.first_time, r.time)
        self.last_time = max(self.last_time, r.time)
        route = self.routes[r.route]
        route.requests += 1
        route.server_errors += code >= 500
        route.client_errors += 400 <= code < 500
        route.durations.append(r.duration_s)
        if r.ttft_s is not None:
            route.ttfts.append(r.ttft_s)
        self._tenant(r)
        if self.costs is not None:
            self.costs.add(r)
        if r.ttft_s is not None:
            self._timings(r, r.ttft_s)

    def _tenant(self, r: UsageRecord) -> None:
        tenant = r.tenant or "-"
        row = self.tenants.get(tenant)
        if row is None:
            row = self.tenants[tenant] = TenantRow(tenant, 0, 0, 0, dict.fromkeys(TOKEN_TYPES, 0))
        row.requests += 1
        row.throttled += r.status_code == 429
        row.server_errors += r.status_code >= 500
        for kind, value in zip(TOKEN_TYPES, (r.input_tokens, r.cached_tokens, r.output_tokens), strict=True):
            row.tokens[kind] += value
        row.reasoning_tokens += reasoning_tokens(r)

    def _timings(self, r: UsageRecord, ttft: float) -> None:
        for st in r.stages:
            if st.name not in self.per_stage:  # a stage the catalog lacks: zero for the requests before it
                self.per_stage[st.name] = array("d", bytes(8 * len(self.ttfts)))
                self.before_first[st.name] = True
            if st.name not in self.catalog and st.start_s + st.duration_s > ttft + 1e-6:
                self.before_first[st.name] = False
        totals = stage_totals(r)
        self.observed.update(totals)
        for name, values in self.per_stage.items():
            values.append(totals.get(name, 0.0))
        self.ttfts.append(ttft)
        row = self.cache.get(r.route)
        if row is None:
            row = self.cache[r.route] = CacheRow(r.route, 0, 0, 0, 0)
        row.requests += 1
        row.input_tokens += r.input_tokens
        row.cached_tokens += r.cached_tokens
        row.predicted_tokens += int(r.extra.get("predicted_cached_tokens") or 0)

    def result(self) -> LedgerSummary:
        catalog, ttfts = self.catalog, self.ttfts
        mean_ttft = statistics.fmean(ttfts) if ttfts else 0.0
        stages = []
        for name, values in self.per_stage.items():
            if name not in self.observed:
                continue
            owner = catalog.owner(name) if name in catalog or name == UNATTRIBUTED else UNKNOWN_OWNER
            mean = statistics.fmean(values) if values else 0.0
            share = (mean / mean_ttft if mean_ttft else 0.0) if self.before_first[name] else None
            stages.append(StageRow(name, owner, percentile(values, 0.5), percentile(values, 0.95), mean, share))
        routes = [
            RouteRow(
                name,
                f.requests,
                f.server_errors,
                f.client_errors,
                percentile(f.ttfts, 0.5) if f.ttfts else None,
                percentile(f.ttfts, 0.95) if f.ttfts else None,
                percentile(f.durations, 0.5),
            )
            for name, f in sorted(self.routes.items())
        ]
        tenants = sorted(self.tenants.values(), key=lambda t: t.tenant)
        requests = sum(self.statuses.values())
        return LedgerSummary(
            requests=requests,
            errors=sum(n for code, n in self.statuses.items() if code >= 500),
            ttft_p50_s=percentile(ttfts, 0.5) if ttfts else None,
            ttft_p95_s=percentile(ttfts, 0.95) if ttfts else None,
            stages=stages,
            cache=sorted(self.cache.values(), key=lambda c: c.route),
            tokens={kind: sum(t.tokens[kind] for t in tenants) for kind in TOKEN_TYPES},
            tokens_by_tenant={t.tenant: t.tokens for t in tenants},
            tenants=tenants,
            ttft_p99_s=percentile(ttfts, 0.99) if ttfts else None,
            routes=routes,
            statuses=dict(sorted(self.statuses.items())),
            first_time=self.first_time if requests else 0.0,
            last_time=self.last_time if requests else 0.0,
            cost=self.costs.result() if self.costs is not None else None,
            reasoning_tokens=sum(t.reasoning_tokens for t in tenants),
        )


_STATUS = re.compile(r"[1-5](?:[0-9]{2}|xx)")


def status_filter(spec: str) -> Callable[[int], bool]:
    """A test of status codes from ``"503"`` (one code) or ``"5xx"`` (a class); ``ValueError`` for anything else."""
    spec = spec.strip().lower()
    if not _STATUS.fullmatch(spec):
        raise ValueError(f"{spec!r} is not a status code (503) or class (5xx)")
    if spec.endswith("xx"):
        lo = int(spec[0]) * 100
        return lambda code: lo <= code < lo + 100
    exact = int(spec)
    return lambda code: code == exact


def select(
    records: Iterable[UsageRecord],
    *,
    since: float | None = None,
    route: str | None = None,
    tenant: str | None = None,
    model: str | None = None,
    status: str | None = None,
) -> Iterator[UsageRecord]:
    """The records that started at or after ``since`` (epoch seconds) and match every given label, and ``status``
    (a code such as ``"503"`` or a class such as ``"5xx"``, see :func:`status_filter`)."""
    status_ok = status_filter(status) if status is not None else None
    for r in records:
        if since is not None and r.time < since:
            continue
        if (route is not None and r.route != route) or (tenant is not None and r.tenant != tenant):
            continue
        if model is not None and r.model != model:
            continue
        if status_ok is not None and not status_ok(r.status_code):
            continue
        yield r


def slowest(records: Iterable[UsageRecord], count: int, *, by: str = "ttft") -> list[UsageRecord]:
    """The ``count`` slowest records by TTFT (requests without a first token are left out) or by duration."""
    if by == "ttft":
        return heapq.nlargest(count, (r for r in records if r.ttft_s is not None), key=lambda r: r.ttft_s or 0.0)
    if by == "duration":
        return heapq.nlargest(count, records, key=lambda r: r.duration_s)
    raise ValueError(f"by must be ttft or duration, got {by!r}")


def find(records: Iterable[UsageRecord], ident: str) -> list[UsageRecord]:
    """The records whose request id or trace id is ``ident`` (a trace id may cover several requests)."""
    ident = ident.strip().lower()
    return [r for r in records if r.request_id.lower() == ident or (r.trace_id or "").lower() == ident]
