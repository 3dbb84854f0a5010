"""Aggregates over usage records: where the time goes per stage, TTFT, prompt-cache hit rate per route, tokens per
tenant; the slowest requests; one request by id."""

from __future__ import annotations

import heapq
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from llmpath.instrumentation import STAGES, UNATTRIBUTED
from llmpath.instrumentation.catalog import TOKEN_TYPES, StageCatalog
from llmpath.instrumentation.usage import UsageRecord

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
class LedgerSummary:
    requests: int
    #: Requests answered 5xx (the server's failures; 4xx are the clients').
    errors: int
    ttft_p50_s: float
    ttft_p95_s: float
    stages: list[StageRow]
    cache: list[CacheRow]
    tokens: dict[str, int]
    tokens_by_tenant: dict[str, dict[str, int]] = field(default_factory=dict)
    tenants: list[TenantRow] = field(default_factory=list)
    ttft_p99_s: float = 0.0
    routes: list[RouteRow] = field(default_factory=list)
    #: Requests per HTTP status code.
    statuses: dict[int, int] = field(default_factory=dict)
    #: First and last request start (epoch seconds; 0 without records).
    first_time: float = 0.0
    last_time: float = 0.0


def stage_totals(record: UsageRecord) -> dict[str, float]:
    """Seconds per stage for one request (a stage that ran twice, e.g. gateway + backend queue, is summed)."""
    totals: dict[str, float] = defaultdict(float)
    for st in record.stages:
        totals[st.name] += st.duration_s
    if record.unattributed_s is not None:
        totals[UNATTRIBUTED] += record.unattributed_s
    return totals


def summarize(records: Iterable[UsageRecord], catalog: StageCatalog = STAGES) -> LedgerSummary:
    """Aggregate ledger records into the report's figures (successful requests for timings and cache).

    Stages come in ``catalog`` order with its owners; a stage the records have and the catalog lacks follows them
    (owner ``unknown``; counted as before the first token when it always ended before it), so no time goes missing.
    """
    records = list(records)
    ok = [r for r in records if r.status_code == 200 and r.ttft_s is not None]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    mean_ttft = statistics.fmean(ttfts) if ttfts else 0.0
    per_stage: dict[str, list[float]] = {name: [] for name in catalog.names_with_unattributed}
    before_first = {name: name == UNATTRIBUTED or catalog[name].before_first_token for name in per_stage}
    for r in ok:
        for st in r.stages:
            if st.name not in per_stage:
                per_stage[st.name], before_first[st.name] = [], True
            if st.name not in catalog and st.start_s + st.duration_s > (r.ttft_s or 0.0) + 1e-6:
                before_first[st.name] = False
    for r in ok:
        totals = stage_totals(r)
        for name, values in per_stage.items():
            values.append(totals.get(name, 0.0))
    rows = []
    for name, values in per_stage.items():
        owner = catalog.owner(name) if name in catalog or name == UNATTRIBUTED else UNKNOWN_OWNER
        mean = statistics.fmean(values) if values else 0.0
        share = (mean / mean_ttft if mean_ttft else 0.0) if before_first[name] else None
        rows.append(StageRow(name, owner, percentile(values, 0.5), percentile(values, 0.95), mean, share))

    cache: dict[str, CacheRow] = {}
    for r in ok:
        row = cache.setdefault(r.route, CacheRow(r.route, 0, 0, 0, 0))
        row.requests += 1
        row.input_tokens += r.input_tokens
        row.cached_tokens += r.cached_tokens
        row.predicted_tokens += int(r.extra.get("predicted_cached_tokens") or 0)

    by_route: dict[str, list[UsageRecord]] = defaultdict(list)
    for r in records:
        by_route[r.route].append(r)
    routes = []
    for route, mine in sorted(by_route.items()):
        firsts = [r.ttft_s for r in mine if r.ttft_s is not None]
        routes.append(
            RouteRow(
                route,
                len(mine),
                sum(r.status_code >= 500 for r in mine),
                sum(400 <= r.status_code < 500 for r in mine),
                percentile(firsts, 0.5) if firsts else None,
                percentile(firsts, 0.95) if firsts else None,
                percentile([r.duration_s for r in mine], 0.5),
            )
        )

    tokens = dict.fromkeys(TOKEN_TYPES, 0)
    by_tenant: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(TOKEN_TYPES, 0))
    tenant_rows: dict[str, TenantRow] = {}
    for r in records:
        tenant = r.tenant or "-"
        for kind in TOKEN_TYPES:
            value = getattr(r, f"{kind}_tokens")
            tokens[kind] += value
            by_tenant[tenant][kind] += value
        row = tenant_rows.get(tenant)
        if row is None:
            row = tenant_rows[tenant] = TenantRow(tenant, 0, 0, 0, by_tenant[tenant])
        row.requests += 1
        row.throttled += r.status_code == 429
        row.server_errors += r.status_code >= 500
    times = [r.time for r in records]
    return LedgerSummary(
        requests=len(records),
        errors=sum(r.status_code >= 500 for r in records),
        ttft_p50_s=percentile(ttfts, 0.5),
        ttft_p95_s=percentile(ttfts, 0.95),
        stages=rows,
        cache=sorted(cache.values(), key=lambda c: c.route),
        tokens=tokens,
        tokens_by_tenant=dict(by_tenant),
        tenants=sorted(tenant_rows.values(), key=lambda t: t.tenant),
        ttft_p99_s=percentile(ttfts, 0.99),
        routes=routes,
        statuses=dict(sorted(Counter(r.status_code for r in records).items())),
        first_time=min(times, default=0.0),
        last_time=max(times, default=0.0),
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
