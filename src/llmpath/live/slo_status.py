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
from rich.markup import escape
from rich.table import Table

from llmpath.live.promapi import PrometheusClient

_SLOTH_LABELS = frozenset({"__name__", "sloth_id", "sloth_service", "sloth_slo", "sloth_window"})

Group = tuple[tuple[str, str], ...]


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
    #: Objective in percent (99.9; None when ``sloth_slo_info`` has no number).
    objective: float | None
    #: Share of good events over ``window`` (None without traffic).
    sli: float | None
    window: str | None
    #: Current burn rate (Sloth's ``slo:current_burn_rate:ratio``; 1 = the budget lasts exactly the period).
    burn_rate: float | None
    #: Share of the period's error budget left (below 0: the objective is missed for this period).
    budget_remaining: float | None
    alerts: list[FiringAlert] = field(default_factory=list)
    #: Whether Prometheus has any of the SLO's recorded series (SLI, burn rate, budget): False when its recording
    #: rules are not loaded or not evaluated, so every number above is unknown rather than healthy.
    recorded: bool = True
    #: Whether Prometheus has the SLO's recording rules loaded (only looked up when ``recorded`` is False: loaded
    #: rules without series mean no traffic or unscraped metrics; unloaded ones mean the state is unknown).
    rules_loaded: bool = True


def slo_status(
    client: PrometheusClient, *, service: str | None = None, unknown: list[tuple[str, FiringAlert]] | None = None
) -> list[SloRow]:
    """Every SLO Prometheus evaluates (of ``service`` only, if given), sorted by service, SLO and group.
    Firing alerts of an SLO that ``sloth_slo_info`` does not describe go to ``unknown`` (sloth_id, alert)."""
    only = f"sloth_service={json.dumps(service)}" if service else ""
    info = {r["metric"]["sloth_id"]: r["metric"] for r in client.query(f"sloth_slo_info{{{only}}}")}
    series = {
        name: client.query(f"{name}{{{only}}}")
        for name in ("slo:current_burn_rate:ratio", "slo:period_error_budget_remaining:ratio")
    }
    ratios = client.query(f'{{__name__=~"slo:sli_error:ratio_rate.+"{", " + only if only else ""}}}')
    grouping = _grouping_labels(info, [*ratios, *(r for results in series.values() for r in results)])
    sli = _by_group(ratios, grouping)
    burn = _latest(series["slo:current_burn_rate:ratio"], grouping)
    budget = _latest(series["slo:period_error_budget_remaining:ratio"], grouping)
    firing: dict[tuple[str, Group], list[FiringAlert]] = defaultdict(list)
    for alert in client.alerts():
        labels = alert["labels"]
        if alert.get("state") != "firing" or "sloth_id" not in labels:
            continue
        severity = labels.get("sloth_severity", labels.get("severity", ""))
        runbook = (alert.get("annotations") or {}).get("runbook_url")
        found = FiringAlert(labels.get("alertname", "?"), severity, runbook)
        if labels["sloth_id"] not in info:
            if unknown is not None and (service is None or labels.get("sloth_service") in (None, service)):
                unknown.append((labels["sloth_id"], found))
            continue
        firing[_key(labels, grouping)].append(found)
    recorded = {_key(r["metric"], grouping)[0] for r in [*ratios, *(r for res in series.values() for r in res)]}
    loaded = _loaded_rules(client) if set(info) - recorded else set()

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
                    objective=_objective(meta.get("sloth_objective")),
                    sli=None if error is None else 1.0 - error,
                    window=window,
                    burn_rate=burn.get((slo_id, group)),
                    budget_remaining=budget.get((slo_id, group)),
                    alerts=sorted(firing.get((slo_id, group), []), key=lambda a: (a.severity, a.name)),
                    recorded=slo_id in recorded,
                    rules_loaded=slo_id in recorded or slo_id in loaded,
                )
            )
    return sorted(rows, key=lambda r: (r.service, r.slo, sorted(r.group.items())))


def _loaded_rules(client: PrometheusClient) -> set[str]:
    """The sloth_id of every SLO with a loaded SLI recording rule (``slo:sli_error:ratio_rate<window>``; the
    metadata group's ``slo:*`` rules say nothing about the SLI's)."""
    return {
        str((rule.get("labels") or {}).get("sloth_id"))
        for group in client.rule_groups()
        for rule in group.get("rules", [])
        if rule.get("type") == "recording" and str(rule.get("name", "")).startswith("slo:sli_error:ratio_rate")
    }


def slo_services(client: PrometheusClient) -> list[str]:
    """The services of every SLO Prometheus evaluates (``sloth_slo_info``), sorted."""
    return sorted({r["metric"].get("sloth_service", "") for r in client.query("sloth_slo_info")})


def _grouping_labels(info: dict[str, dict[str, str]], results: list[dict[str, Any]]) -> dict[str, frozenset[str]]:
    """Per SLO, the labels that tell its groups apart (its ``group_by``, e.g. ``route``): the labels of its
    recorded series that are neither Sloth's nor the SLO's static labels (which ``sloth_slo_info`` carries too).
    Alerts carry more labels (severity, routing keys, …); only these say which group an alert belongs to."""
    out: dict[str, set[str]] = defaultdict(set)
    for r in results:
        metric = r["metric"]
        static = info.get(metric.get("sloth_id", ""), {})
        out[metric.get("sloth_id", "")] |= {
            k for k, v in metric.items() if k not in _SLOTH_LABELS and static.get(k) != v
        }
    return {slo_id: frozenset(names) for slo_id, names in out.items()}


def _key(labels: dict[str, str], grouping: dict[str, frozenset[str]]) -> tuple[str, Group]:
    """(SLO id, group) of a series or alert: only the SLO's grouping labels count."""
    names = grouping.get(labels.get("sloth_id", ""), frozenset())
    return labels.get("sloth_id", ""), tuple(sorted((k, v) for k, v in labels.items() if k in names))


def _objective(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else math.nan
    except ValueError:
        return None
    return None if math.isnan(value) or math.isinf(value) else value


def _value(result: dict[str, Any]) -> float | None:
    value = float(result["value"][1])
    return None if math.isnan(value) or math.isinf(value) else value


def _latest(
    results: list[dict[str, Any]], grouping: dict[str, frozenset[str]]
) -> dict[tuple[str, Group], float | None]:
    return {_key(r["metric"], grouping): _value(r) for r in results}


def _by_group(
    results: list[dict[str, Any]], grouping: dict[str, frozenset[str]]
) -> dict[tuple[str, Group], tuple[str, float | None]]:
    """(SLO id, group) → (shortest window, its error ratio)."""
    best: dict[tuple[str, Group], tuple[float, str, float | None]] = {}
    for r in results:
        metric = r["metric"]
        window = metric.get("sloth_window") or metric["__name__"].removeprefix("slo:sli_error:ratio_rate")
        seconds = parse_duration(window).total_seconds()
        key = _key(metric, grouping)
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
        firing = escape("+".join(sorted({a.severity for a in r.alerts}))) or ("–" if r.recorded else "[red]no data[/]")
        budget = "–" if r.budget_remaining is None else (
            "[red]exhausted[/]" if r.budget_remaining <= 0 else pct(r.budget_remaining))  # fmt: skip
        group = r.group.get(group_header) if len(keys) == 1 else ",".join(f"{k}={v}" for k, v in r.group.items())
        out.add_row(  # label values are Prometheus's text, not rich markup (a route "[/]" must not crash)
            escape(name) if name != previous else "",
            escape(r.stage) if name != previous else "",
            escape(group or "–"),
            "?" if r.objective is None else f"{r.objective:g}%",
            "–" if r.sli is None else pct(r.sli),
            "–" if r.burn_rate is None else f"{r.burn_rate:.2f}×",
            budget,
            f"[red]{firing}[/]" if r.alerts else firing,
        )
        previous = name
    return out


def firing_lines(rows: list[SloRow]) -> list[str]:
    """One line per firing alert: name, severity, group, owning stage and team, runbook (escaped for rich
    markup: the values are Prometheus's text)."""
    lines = []
    for r in rows:
        group = " ".join(f"{k}={v}" for k, v in sorted(r.group.items()))
        for a in r.alerts:
            where = f" {group}" if group else ""
            runbook = f" — runbook {a.runbook_url}" if a.runbook_url else ""
            lines.append(escape(f"{a.name} ({a.severity}){where}: stage {r.stage}, owner {r.owner}{runbook}"))
    return lines
