"""The "SLOs" dashboard: one row per SLO of the compiled specs, read from Sloth-convention recording rules.

Each row shows the objective, the current SLI, the error budget left over the period, the current and period
burn rates, firing alerts and the owning stage, then the burn rate per alert window — the panel every alert's
``dashboard_url`` opens (id ``catalog.stable_panel_id(f"slo:{slo_id}:burn")``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from grafanalib.core import Dashboard, DashboardLink

from llmpath.dashboards import common
from llmpath.dashboards.panels import Board, Query, Steps, steps
from llmpath.instrumentation.catalog import stable_panel_id

SLO_LABELS = "sloth_id, sloth_slo, sloth_service"
_REGEX_SPECIAL = re.compile(r"([.+*?()\[\]{}|^$\\])")
BUDGET_STEPS = steps(("red", None), ("orange", 0), ("yellow", 0.25), ("green", 0.5))
#: The period's average burn rate, coloured as the budget it leaves (burn 1 = budget 0).
PERIOD_BURN_STEPS = steps(("green", None), ("yellow", 0.5), ("orange", 0.75), ("red", 1))


def burn_panel_key(slo_id: str) -> str:
    """Key of an SLO's burn-rate panel; alerts deep-link to ``stable_panel_id(burn_panel_key(id))``."""
    return f"slo:{slo_id}:burn"


def burn_panel_id(slo_id: str) -> int:
    """Panel id of an SLO's burn-rate panel (what ``dashboard_url`` carries as ``viewPanel``)."""
    return stable_panel_id(burn_panel_key(slo_id))


@dataclass(frozen=True, slots=True)
class SloView:
    """What the dashboard needs to know about one compiled SLO."""

    id: str
    service: str
    name: str
    objective: float  # percent
    period: str
    stage: str | None
    owner: str | None
    description: str
    windows: tuple[str, ...]  # SLI recording windows used by the alerts, shortest first
    factors: tuple[tuple[str, float], ...]  # (severity, burn factor) of every burn-rate alert window pair
    grouping: tuple[str, ...]  # labels the SLI keeps (e.g. route): the dashboard filters on those it knows
    #: A latency SLI's bound (histogram, label matchers, threshold); ``None`` for other SLIs.
    latency: LatencyBound | None = None
    #: Whether the SLI is the share of 5xx answers among ``llmpath_requests_total`` (the API path's error ratio).
    counts_server_errors: bool = False
    #: ``(alert name, severity, runbook URL)`` of the alerts whose runbook URL is absolute (``--runbook-base-url``).
    runbooks: tuple[tuple[str, str, str], ...] = ()

    @property
    def error_budget(self) -> float:
        """The error budget as a ratio (``1 - objective/100``, rounded off float noise: 99.9 → 0.001)."""
        return round(1 - self.objective / 100, 10)

    @property
    def fastest_page_factor(self) -> float | None:
        """The lowest burn factor that pages (the 6× of Sloth's 30m/6h pair), or ``None`` without page alerts."""
        return min((f for severity, f in self.factors if severity == "page"), default=None)


@dataclass(frozen=True, slots=True)
class LatencyBound:
    """A latency SLO's bound: requests of ``histogram`` (with ``matchers``, e.g. ``stage="prefill"``) should take at
    most ``threshold`` seconds."""

    histogram: str
    matchers: tuple[tuple[str, str], ...]
    threshold: float


def _selector(view: SloView, *extra: str) -> str:
    matchers = [f'sloth_id="{view.id}"', *extra]
    if "route" in view.grouping:
        matchers.append('route=~"$route"')
    return "{" + ", ".join(matchers) + "}"


def _id_regex(views: Iterable[SloView]) -> str:
    return "|".join(_REGEX_SPECIAL.sub(r"\\\\\1", v.id) for v in views)


def build(views: Sequence[SloView]) -> Dashboard:
    """Build the SLOs dashboard for the given SLOs (grafanalib object; see ``grafana.finalize``)."""
    b = Board(common.SAMPLE_VARIABLES)
    if views:
        _overview(b, views)
    for view in views:
        _slo_row(b, view)
    return common.dashboard(
        "slos",
        "llmpath / SLOs",
        "Every SLO compiled from the specs: objective, current SLI, error budget left, burn rates and firing "
        "alerts, with the stage and team that own it. Alerts link to the burn-rate panel of their SLO.",
        b,
        common.llmpath_variables(model=False),  # SLO series carry no model label
        tags=["slo"],
    )


def _overview(b: Board, views: Sequence[SloView]) -> None:
    b.row("row:slo_overview", "All SLOs")
    ids = _id_regex(views)
    b.stat(
        "slos:budget_remaining", "Error budget remaining",
        "Share of each SLO's error budget left over its period (below 0: the objective is missed).", "percentunit",
        [Query(f'slo:period_error_budget_remaining:ratio{{sloth_id=~"{ids}"}}',
               "{{sloth_service}} / {{sloth_slo}} {{route}}")],
        w=12, thresholds=BUDGET_STEPS, decimals=1,
    )  # fmt: skip
    for severity, color in (("page", "red"), ("ticket", "orange")):
        b.stat(
            f"slos:firing_{severity}", f"Firing {severity} alerts",
            f"SLO alerts of severity {severity} firing now (0 when none).", "none",
            [Query(f'count(ALERTS{{alertstate="firing", sloth_severity="{severity}", sloth_id=~"{ids}"}}) '
                   "or vector(0)")],
            w=6, thresholds=steps(("green", None), (color, 1)), graph=False, no_value="0",
        )  # fmt: skip


def _slo_row(b: Board, view: SloView) -> None:
    stage = f"stage {view.stage}" if view.stage else "whole request path"
    owner = common.literal(view.owner) if view.owner else "unowned"
    b.row(
        f"row:slo:{view.id}",
        f"{view.service} / {view.name} — {view.objective:.10g}% over {view.period} ({stage}, {owner})",
    )
    about = f"SLO {view.service}/{view.name}: {common.literal(view.description) or 'no description'}"
    sel = _selector(view)
    meta = f'{{sloth_id="{view.id}"}}'
    short = view.windows[0]
    burn_steps = _burn_steps(view)
    key = f"slo:{view.id}"
    b.stat(f"{key}:objective", "Objective", f"{about} Target share of good events.", "percentunit",
           [Query(f"slo:objective:ratio{meta}")], w=3, decimals=_percent_decimals(view.objective),
           graph=False)  # fmt: skip
    b.stat(
        f"{key}:sli", f"SLI ({short})", f"{about} Share of good events over the last {short}.", "percentunit",
        [Query(f"1 - slo:sli_error:ratio_rate{short}{sel}", "{{route}}")], w=4, decimals=3,
    )  # fmt: skip
    b.stat(
        f"{key}:budget_remaining", f"Budget remaining ({view.period})",
        f"{about} Share of the error budget left over the {view.period} period.", "percentunit",
        [Query(f"slo:period_error_budget_remaining:ratio{sel}", "{{route}}")], w=4, thresholds=BUDGET_STEPS, decimals=1,
    )  # fmt: skip
    b.stat(
        f"{key}:burn_now", "Burn rate now",
        f"{about} How fast the budget burns now (1 = exactly the budget over the period).", "none",
        [Query(f"slo:current_burn_rate:ratio{sel}", "{{route}}")], w=3, thresholds=burn_steps, decimals=2,
    )  # fmt: skip
    b.stat(
        f"{key}:burn_period", f"Burn rate ({view.period})",
        f"{about} Average burn rate over the whole period.", "none",
        [Query(f"slo:period_burn_rate:ratio{sel}", "{{route}}")], w=3, thresholds=PERIOD_BURN_STEPS, decimals=2,
    )  # fmt: skip
    b.stat(
        f"{key}:firing", "Firing alerts", f"{about} This SLO's alerts firing now.", "none",
        [Query(f'count(ALERTS{{alertstate="firing", sloth_id="{view.id}"}}) or vector(0)')],
        w=3, thresholds=steps(("green", None), ("red", 1)), graph=False, no_value="0",
    )  # fmt: skip
    b.stat(
        f"{key}:owner", "Owning stage", f"{about} The stage this SLO measures and the team that owns it.", "none",
        [Query(f"sloth_slo_info{meta}", f"{view.stage or 'request path'} → {owner}")],
        w=4, text_mode="name", graph=False, no_value=f"{view.stage or 'request path'} → {owner}",
    )  # fmt: skip
    budget = f"slo:error_budget:ratio{meta}"
    b.timeseries(
        burn_panel_key(view.id), "Burn rate by window",
        f"{about} Error rate ÷ error budget over each alert window. Alerts fire when both windows of a pair are "
        f"above their factor: {_factor_text(view)}.", "none",
        [Query(f"slo:sli_error:ratio_rate{w}{sel}\n/ on ({SLO_LABELS}) group_left ()\n{budget}", f"{w} {{{{route}}}}")
         for w in view.windows],
        thresholds=burn_steps, threshold_style="dashed", minimum=0, links=_runbook_links(view),
    )  # fmt: skip
    sli_windows = dict.fromkeys((short, view.windows[-1]))
    b.timeseries(
        f"{key}:sli_history", "SLI and objective", f"{about} Good-event share per window against the objective.",
        "percentunit",
        [
            *(Query(f"1 - slo:sli_error:ratio_rate{w}{sel}", f"SLI {w} {{{{route}}}}") for w in sli_windows),
            Query(f"slo:objective:ratio{meta}", "objective"),
        ],
        w=6,
    )  # fmt: skip
    b.timeseries(
        f"{key}:budget_history", "Error budget remaining",
        f"{about} Budget left over the {view.period} period, over time.", "percentunit",
        [Query(f"slo:period_error_budget_remaining:ratio{sel}", "{{route}}")], w=6, thresholds=BUDGET_STEPS,
    )  # fmt: skip


def _percent_decimals(objective: float) -> int:
    """Decimals that show an objective as written (99.99999 needs 5; at least 3, as 99.900%)."""
    return max(3, len(f"{objective:.10g}".partition(".")[2]))


def _burn_steps(view: SloView) -> Steps:
    """Burn-rate colours at the alerts' factors: yellow from the lowest ticket factor, orange from the highest,
    red from the lowest page factor (Sloth's defaults: 1, 3, 6); without alerts, yellow from 1."""
    ticket = sorted({f for severity, f in view.factors if severity != "page"})
    page = view.fastest_page_factor
    marks = [("yellow", ticket[0] if ticket else 1.0)]
    if len(ticket) > 1:
        marks.append(("orange", ticket[-1]))
    if page is not None:
        marks.append(("red", page))
    kept: list[tuple[str, float | None]] = [("green", None)]
    for color, value in marks:
        if value > (kept[-1][1] or 0.0):
            kept.append((color, value))
    return steps(*kept)


def _runbook_links(view: SloView) -> list[dict[str, object]]:
    """Panel links to the runbooks of the SLO's alerts (only where their URL is absolute)."""
    return [
        DashboardLink(
            title=f"Runbook: {name} ({severity})", uri=url, type="link", targetBlank=True, keepTime=False,
            tooltip=f"What to do when {name} fires",
        ).to_json_data()
        for name, severity, url in view.runbooks
    ]  # fmt: skip


def _factor_text(view: SloView) -> str:
    return ", ".join(f"{severity} ×{factor:g}" for severity, factor in view.factors) or "no burn-rate alerts"
