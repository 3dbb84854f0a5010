"""The demo's report: where the time goes per stage, TTFT, prompt-cache hit rate, tokens, and SLO status.

Request figures come from the usage ledger (one record per request, written by the instrumentation); SLO
status comes from Prometheus evaluating the compiled recording and alerting rules.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from promql_parser import parse_duration

from llmpath.demo.prometheus import PrometheusClient
from llmpath.instrumentation import STAGES, UNATTRIBUTED
from llmpath.instrumentation.usage import UsageRecord
from llmpath.slo import CompiledSLO


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
    errors: int
    ttft_p50_s: float
    ttft_p95_s: float
    stages: list[StageRow]
    cache: list[CacheRow]
    tokens: dict[str, int]
    tokens_by_tenant: dict[str, dict[str, int]] = field(default_factory=dict)


def stage_totals(record: UsageRecord) -> dict[str, float]:
    """Seconds per stage for one request (a stage that ran twice, e.g. gateway + backend queue, is summed)."""
    totals: dict[str, float] = defaultdict(float)
    for st in record.stages:
        totals[st.name] += st.duration_s
    if record.unattributed_s is not None:
        totals[UNATTRIBUTED] += record.unattributed_s
    return totals


def summarize(records: Iterable[UsageRecord]) -> LedgerSummary:
    """Aggregate ledger records into the report's figures (successful requests for timings and cache)."""
    records = list(records)
    ok = [r for r in records if r.status_code == 200 and r.ttft_s is not None]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    mean_ttft = statistics.fmean(ttfts) if ttfts else 0.0
    per_stage: dict[str, list[float]] = {name: [] for name in STAGES.names_with_unattributed}
    for r in ok:
        totals = stage_totals(r)
        for name, values in per_stage.items():
            values.append(totals.get(name, 0.0))
    rows = []
    for name, values in per_stage.items():
        before_first = name == UNATTRIBUTED or STAGES[name].before_first_token
        mean = statistics.fmean(values) if values else 0.0
        share = (mean / mean_ttft if mean_ttft else 0.0) if before_first else None
        rows.append(StageRow(name, STAGES.owner(name), percentile(values, 0.5), percentile(values, 0.95), mean, share))

    cache: dict[str, CacheRow] = {}
    for r in ok:
        row = cache.setdefault(r.route, CacheRow(r.route, 0, 0, 0, 0))
        row.requests += 1
        row.input_tokens += r.input_tokens
        row.cached_tokens += r.cached_tokens
        row.predicted_tokens += int(r.extra.get("predicted_cached_tokens") or 0)

    tokens = {"input": 0, "cached": 0, "output": 0}
    by_tenant: dict[str, dict[str, int]] = defaultdict(lambda: {"input": 0, "cached": 0, "output": 0})
    for r in records:
        for kind, value in (("input", r.input_tokens), ("cached", r.cached_tokens), ("output", r.output_tokens)):
            tokens[kind] += value
            by_tenant[r.tenant or "-"][kind] += value
    return LedgerSummary(
        requests=len(records),
        errors=sum(r.status_code >= 500 for r in records),
        ttft_p50_s=percentile(ttfts, 0.5),
        ttft_p95_s=percentile(ttfts, 0.95),
        stages=rows,
        cache=sorted(cache.values(), key=lambda c: c.route),
        tokens=tokens,
        tokens_by_tenant=dict(by_tenant),
    )


@dataclass
class SloRow:
    slo: str
    stage: str
    route: str
    objective: float
    sli: float | None
    budget_remaining: float | None
    #: Firing alerts as (alert name, severity) pairs.
    alerts: list[tuple[str, str]]


def slo_status(client: PrometheusClient, slos: Sequence[CompiledSLO]) -> list[SloRow]:
    """SLI over the shortest window and budget remaining per SLO (and route), with firing alerts, from Prometheus."""
    firing: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for alert in client.alerts():
        if alert.get("state") == "firing":
            labels = alert["labels"]
            severity = labels.get("sloth_severity", labels.get("severity", ""))
            firing[(labels.get("sloth_id", ""), labels.get("route", ""))].append((labels["alertname"], severity))
    rows: list[SloRow] = []
    for slo in slos:
        window = min((w.short for a in slo.alerts for w in a.windows), key=_seconds, default="5m")
        sli = {r["metric"].get("route", ""): 1 - float(r["value"][1]) for r in _safe_query(
            client, f'slo:sli_error:ratio_rate{window}{{sloth_id="{slo.id}"}}')}  # fmt: skip
        budget = {r["metric"].get("route", ""): float(r["value"][1]) for r in _safe_query(
            client, f'slo:period_error_budget_remaining:ratio{{sloth_id="{slo.id}"}}')}  # fmt: skip
        for route in sorted(set(sli) | set(budget)) or [""]:
            rows.append(
                SloRow(
                    slo.name,
                    slo.stage or "-",
                    route or "-",
                    slo.objective,
                    sli.get(route),
                    budget.get(route),
                    firing.get((slo.id, route), []),
                )
            )
    return rows


def _safe_query(client: PrometheusClient, expr: str) -> list[dict]:
    results = client.query(expr)
    return [r for r in results if r["value"][1] not in ("NaN", "+Inf", "-Inf")]


def _seconds(duration: str) -> float:
    return parse_duration(duration).total_seconds()
