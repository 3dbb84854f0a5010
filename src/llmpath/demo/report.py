"""The demo's SLO status, read back from Prometheus evaluating the compiled recording and alerting rules (the
request figures come from the usage ledger: :mod:`llmpath.ledger`)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from promql_parser import parse_duration

from llmpath.demo.prometheus import PrometheusClient
from llmpath.slo import CompiledSLO


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
