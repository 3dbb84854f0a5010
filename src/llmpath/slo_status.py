"""SLO status read back from Prometheus: every SLO whose rules it evaluates (Sloth's ``sloth_slo_info``), per group
(e.g. per route): SLI over the shortest window recorded, current burn rate, error budget left, and firing alerts
with their runbooks. What ``llmpath slo status`` and the demo's report print; nothing is read from spec files,
so it shows what Prometheus actually runs."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from promql_parser import parse_duration
from rich.table import Table

from llmpath.promapi import PrometheusClient

_SLOTH_LABELS = frozenset({"__name__", "sloth_id", "sloth_service", "sloth_slo", "sloth_window"})
#: Labels of Sloth's alerts that are not the SLO's grouping labels.
_ALERT_LABELS = frozenset({"alertname", "sloth_severity", "severity", "stage", "owner", "sloth_mode", "sloth_spec"})


@dataclass
class FiringAlert:
    name: str
    severity: str
    runbook_url: str | None = None


@dataclass
class SloRow:
    """One SLO, or one group of a grouped SLO (``group``: its labels, e.g. ``{"route": "chat"}``)."""

    slo_id: str
    service: str
    slo: str
    stage: str
    owner: str
    group: dict[str, str]
    #: Objective in percent (99.9).
    objective: float
    #: Share of good events over ``window`` (None without traffic).
    sli: float | None
    window: str | None
    #: Current burn rate (Sloth's ``slo:current_burn_rate:ratio``; 1 = the budget lasts exactly the period).
    burn_rate: float | None
    #: Share of the period's error budget left (below 0: the objective is missed for this period).
    budget_remaining: float | None
    alerts: list[FiringAlert] = field(default_factory=list)


def slo_status(client: PrometheusClient, *, service: str | None = None) -> list[SloRow]:
    """Every SLO Prometheus evaluates (of ``service`` only, if given), sorted by service, SLO and group."""
    only = f"sloth_service={json.dumps(service)}" if service else ""
    info = {r["metric"]["sloth_id"]: r["metric"] for r in client.query(f"sloth_slo_info{{{only}}}")}
    sli = _by_group(client.query(f'{{__name__=~"slo:sli_error:ratio_rate.+"{", " + only if only else ""}}}'))
    burn = _latest(client.query(f"slo:current_burn_rate:ratio{{{only}}}"))
    budget = _latest(client.query(f"slo:period_error_budget_remaining:ratio{{{only}}}"))
    firing: dict[tuple[str, tuple[tuple[str, str], ...]], list[FiringAlert]] = defaultdict(list)
    for alert in client.alerts():
        labels = alert["labels"]
        if alert.get("state") != "firing" or labels.get("sloth_id") not in info:
            continue
        severity = labels.get("sloth_severity", labels.get("severity", ""))
        group = _group_key(labels, extra=_ALERT_LABELS)
        runbook = alert.get("annotations", {}).get("runbook_url")
        firing[(labels["sloth_id"], group)].append(FiringAlert(labels["alertname"], severity, runbook))

    rows: list[SloRow] = []
    for slo_id, meta in info.items():
        groups = {g for (i, g) in (*sli, *burn, *budget, *firing) if i == slo_id} or {()}
        for group in groups:
            window, error = sli.get((slo_id, group), (None, None))
            rows.append(
                SloRow(
                    slo_id=slo_id,
                    service=meta.get("sloth_service", ""),
                    slo=meta.get("sloth_slo", slo_id),
                    stage=meta.get("stage", "-"),
                    owner=meta.get("owner", "-"),
                    group=dict(group),
                    objective=float(meta.get("sloth_objective", "nan")),
                    sli=None if error is None else 1.0 - error,
                    window=window,
                    burn_rate=burn.get((slo_id, group)),
                    budget_remaining=budget.get((slo_id, group)),
                    alerts=sorted(firing.get((slo_id, group), []), key=lambda a: (a.severity, a.name)),
                )
            )
    return sorted(rows, key=lambda r: (r.service, r.slo, sorted(r.group.items())))


def _group_key(labels: dict[str, str], extra: frozenset[str] = frozenset()) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in labels.items() if k not in _SLOTH_LABELS and k not in extra))


def _value(result: dict[str, Any]) -> float | None:
    value = float(result["value"][1])
    return None if math.isnan(value) or math.isinf(value) else value


def _latest(results: list[dict[str, Any]]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float | None]:
    return {(r["metric"]["sloth_id"], _group_key(r["metric"])): _value(r) for r in results}


def _by_group(results: list[dict[str, Any]]) -> dict[tuple[str, tuple[tuple[str, str], ...]], tuple[str, float | None]]:
    """(SLO id, group) → (shortest window, its error ratio)."""
    best: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[float, str, float | None]] = {}
    for r in results:
        metric = r["metric"]
        window = metric.get("sloth_window") or metric["__name__"].removeprefix("slo:sli_error:ratio_rate")
        seconds = parse_duration(window).total_seconds()
        key = (metric["sloth_id"], _group_key(metric))
        if key not in best or seconds < best[key][0]:
            best[key] = (seconds, window, _value(r))
    return {key: (window, value) for key, (_, window, value) in best.items()}


def status_table(rows: list[SloRow]) -> Table:
    """The rows as a rich table, one line per SLO and group; firing severities in red (owners and runbooks:
    :func:`firing_lines`)."""
    from llmpath.ledger.render import pct, table

    services = {r.service for r in rows}
    keys = {k for r in rows for k in r.group}
    group_header = next(iter(keys)) if len(keys) == 1 else "group"
    out = table(
        "SLOs, read back from Prometheus (SLI over the shortest window; budget over the period)",
        {"SLO": "left", "stage": "left", group_header: "left", "target": "right", "SLI": "right", "burn": "right",
         "budget": "right", "firing": "left"},
    )  # fmt: skip
    previous = None
    for r in rows:
        name = r.slo if len(services) == 1 else f"{r.service}/{r.slo}"
        firing = "+".join(sorted({a.severity for a in r.alerts})) or "–"
        budget = "–" if r.budget_remaining is None else (
            "[red]exhausted[/]" if r.budget_remaining <= 0 else pct(r.budget_remaining))  # fmt: skip
        group = r.group.get(group_header) if len(keys) == 1 else ",".join(f"{k}={v}" for k, v in r.group.items())
        out.add_row(
            name if name != previous else "",
            r.stage if name != previous else "",
            group or "–",
            f"{r.objective:g}%",
            "–" if r.sli is None else pct(r.sli),
            "–" if r.burn_rate is None else f"{r.burn_rate:.2f}×",
            budget,
            f"[red]{firing}[/]" if r.alerts else firing,
        )
        previous = name
    return out


def firing_lines(rows: list[SloRow]) -> list[str]:
    """One line per firing alert: name, severity, group, owning stage and team, runbook."""
    lines = []
    for r in rows:
        group = " ".join(f"{k}={v}" for k, v in sorted(r.group.items()))
        for a in r.alerts:
            where = f" {group}" if group else ""
            runbook = f" — runbook {a.runbook_url}" if a.runbook_url else ""
            lines.append(f"{a.name} ({a.severity}){where}: stage {r.stage}, owner {r.owner}{runbook}")
    return lines
