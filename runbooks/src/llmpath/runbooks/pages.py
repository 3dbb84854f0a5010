"""What one runbook says, assembled from the compiled alert, its SLO, the stage catalog and the stage knowledge.

Everything stage-specific comes from ``stage_knowledge.toml``; this module only selects and fills it in
(``$window`` → the alert's short window, links with the alert's fixed labels) and adds the SLO arithmetic.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmpath.dashboards.links import ALL, panel_url, parse_panel_ref
from llmpath.dashboards.slos import burn_panel_key
from llmpath.instrumentation.catalog import STAGES, UNATTRIBUTED, StageCatalog, stable_panel_id
from llmpath.runbooks import markdown
from llmpath.runbooks.budget import budget_spent, exhaustion_time, humanize
from llmpath.runbooks.knowledge import Check, Knowledge, KnowledgeError, StageKnowledge
from llmpath.slo.gofmt import go_quote

#: A diagnosis step of a runbook: the knowledge file's check with ``$window`` filled in.
Step = Check

#: How fast each severity needs a human (llm-d / mixin conventions).
RESPONSE: Mapping[str, str] = {
    "page": "respond within 5 minutes, at any hour",
    "ticket": "handle within the next business day",
}
#: Dashboard variables a runbook link may set from the SLO's fixed label matchers.
LINK_VARIABLES: Mapping[str, str] = {"route": "route", "model": "model"}
DEFAULT_WINDOW = "5m"
_RATE_WINDOW_RE = re.compile(r"slo:sli_error:ratio_rate(\w+)")
_SPACES = re.compile(r"\s+")
#: A PromQL string literal (kept as written), a comment (dropped: on one line it would hide the rest) or other text.
_PROMQL_LEXEME = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'|`[^`]*`|#[^\n]*|[^"\'`#]+|.', re.DOTALL)


@dataclass(frozen=True, slots=True)
class Link:
    title: str
    url: str


@dataclass(frozen=True, slots=True)
class WindowRow:
    """One window pair of the alert with its thresholds and budget arithmetic."""

    short: str
    long: str
    factor: float
    error_ratio: float  # the SLI error ratio that trips this pair
    budget_spent: float  # share of the period's budget gone when it fires (0-1)
    exhaustion: str  # "about 2.1 days (50 hours)"


@dataclass(frozen=True, slots=True)
class RelatedAlert:
    name: str
    severity: str
    file: str


@dataclass(frozen=True, slots=True)
class Page:
    """Everything the runbook template renders for one alert."""

    alert: Any  # llmpath.slo AlertInfo
    slo: Any  # llmpath.slo CompiledSLO
    source: str  # the spec file, as cited
    severity: str
    response: str
    stage: str | None
    stage_title: str
    stage_meaning: str
    stage_position: str
    owner: str  # Markdown (the owner's name escaped)
    window: str
    windows: tuple[WindowRow, ...]
    sli_lines: tuple[str, ...]
    grouping: tuple[str, ...]
    budget_link: Link
    stage_links: tuple[Link, ...]
    reality: tuple[Step, ...]
    knowledge: StageKnowledge
    steps: tuple[Step, ...]
    path_steps: tuple[Step, ...]  # whole-path checks when the stage looks healthy (empty for path SLOs)
    related: tuple[RelatedAlert, ...]
    #: The stage catalog file the SLOs were compiled with (``--catalog``), as cited; ``None``: the built-in one.
    catalog_source: str | None = None


def stage_meaning(stage: str | None, knowledge: Knowledge, stages: StageCatalog = STAGES) -> str:
    """The catalog's sentence for a stage or group (knowledge summary for ``unattributed`` and the path)."""
    if stage is not None and stage in stages:
        return stages[stage].meaning
    if (group := stages.group(stage)) is not None:
        return group.meaning
    return knowledge.entry(stage).summary


def stage_position(stage: str | None, stages: StageCatalog = STAGES) -> str:
    """Where the stage sits in the request path, e.g. ``auth → … → **prefill** → decode``."""
    names = list(stages.names_with_unattributed)
    if (group := stages.group(stage)) is not None:
        members = set(group.stages)
        return " → ".join(f"**{n}**" if n in members else n for n in names)
    if stage in names:
        return " → ".join(f"**{n}**" if n == stage else n for n in names)
    return " → ".join(names) + " (all stages)"


def catalog_owner(stage: str | None, stages: StageCatalog = STAGES) -> str | None:
    """The catalog's owning team of a stage or stage group (None for the whole path)."""
    if stage is not None and (stage in stages or stage == UNATTRIBUTED):
        return stages.owner(stage)
    if (group := stages.group(stage)) is not None:
        return group.owner
    return None


def _panel_link(
    ref: str, grafana_url: str, variables: Mapping[str, str], titles: Mapping[tuple[str, int], str] | None
) -> Link:
    dashboard, key = parse_panel_ref(ref)
    if titles is None:
        title = key
    elif (dashboard, stable_panel_id(key)) in titles:
        title = titles[(dashboard, stable_panel_id(key))]
    else:
        raise KnowledgeError(f"stage knowledge panel {ref!r} is not in the generated {dashboard} dashboard")
    return Link(title, panel_url(grafana_url, dashboard, key, variables))


def _steps(entry: StageKnowledge, window: str) -> tuple[Step, ...]:
    return tuple(Step(c.question, c.query.replace("$window", window), c.explain) for c in entry.diagnosis)


def _fixed_variables(slo: Any) -> dict[str, str]:
    """Dashboard variables the SLO pins with an equality matcher (e.g. ``route: chat``); the rest are "All"."""
    selector = getattr(slo.sli, "selector", None) or {}
    values = {}
    for var, label in LINK_VARIABLES.items():
        value = selector.get(label)
        values[var] = value if isinstance(value, str) and value and not any(c in value for c in "|.*+?[]()") else ALL
    return values


def _window_rows(alert: Any, slo: Any) -> tuple[WindowRow, ...]:
    budget = 1 - slo.objective / 100
    return tuple(
        WindowRow(
            short=w.short,
            long=w.long,
            factor=w.factor,
            error_ratio=min(1.0, w.factor * budget),
            budget_spent=budget_spent(slo.period, w.factor, w.long),
            exhaustion=humanize(exhaustion_time(slo.period, w.factor)),
        )
        for w in alert.windows
    )


def _sli_lines(slo: Any, window: str) -> tuple[str, ...]:
    sli = slo.sli
    lines: list[str] = []
    matchers = [_matchers(getattr(sli, "selector", None) or {}), (getattr(sli, "filter", None) or "").strip(" {}")]
    selector = ", ".join(m for m in matchers if m)
    if sli.kind == "latency":
        where = f" matching {markdown.code('{' + selector + '}')}" if selector else ""
        lines.append(
            f"A request is **bad** when `{sli.histogram}` is above **{markdown.number(sli.threshold)} s**{where}."
        )
    for label, query in (
        ("Good-events counter", getattr(sli, "good", None)),
        ("Bad-events counter", getattr(sli, "bad", None)),
        ("All-events counter", getattr(sli, "total", None)),
        (f"Bad events over {window}", sli.error_query),
        (f"All events over {window}", sli.total_query),
        (f"Error ratio over {window}", sli.error_ratio_query),
    ):
        if query:
            lines.append(f"{label}: {markdown.code(_with_window(query, window))}")
    return tuple(dict.fromkeys(lines))


def _matchers(selector: Mapping[str, str]) -> str:
    """``a="x", b="y"`` with every value a PromQL string literal (quotes and backslashes escaped)."""
    return ", ".join(f"{k}={go_quote(v)}" for k, v in selector.items())


def _with_window(query: str, window: str) -> str:
    """A spec query template with Sloth's ``{{.window}}`` filled in, on one line (whitespace inside string
    literals, such as a label value's run of spaces, is kept: it is part of the value)."""
    out: list[str] = []
    other = ""
    for lexeme in _PROMQL_LEXEME.findall(query.replace("{{.window}}", window)):
        if lexeme[0] in "\"'`":
            out += [_SPACES.sub(" ", other), lexeme]
            other = ""
        elif lexeme[0] != "#":
            other += lexeme
    return "".join([*out, _SPACES.sub(" ", other)]).strip()


def _reality_checks(alert: Any, slo: Any, window: str) -> tuple[Step, ...]:
    ident = f'{{sloth_id="{slo.id}"}}'
    traffic = _traffic_query(slo, window)
    traffic_step = (
        Step(
            "Is there traffic, and enough for the ratio to mean something?",
            traffic,
            "Events per second behind the SLI. No result: nothing reaches the measured path or its metrics are not "
            "scraped. With a handful of requests a single failure is a large ratio: confirm on the dashboard before "
            "acting on a low-traffic alert.",
        )
        if traffic
        else None
    )
    if alert.kind == "absent":
        steps = [
            Step(
                "Does the SLI have data?",
                f"slo:sli_error:ratio_rate{window}{ident}",
                "No result confirms the alert. A result means the data came back and the alert is resolving.",
            )
        ]
        return tuple(s for s in (*steps, traffic_step) if s)
    windows = list(dict.fromkeys(w for pair in alert.windows for w in (pair.short, pair.long))) or [window]
    steps = [
        Step(
            f"What is the error ratio over the alert's windows ({', '.join(windows)})?",
            " or ".join(f"slo:sli_error:ratio_rate{w}{ident}" for w in windows),
            "Each window's share of bad events (per route when the SLO is grouped). The alert needs both windows of "
            "a pair above the pair's error-ratio threshold (table above); if only the short one is, it is resolving.",
        ),
        Step(
            "How fast is the budget burning, and how much is left?",
            f"slo:current_burn_rate:ratio{ident} or slo:period_error_budget_remaining:ratio{ident}",
            f"Burn rate now (1 = the budget lasts exactly {slo.period}) and the share of the period's budget left "
            "(below 0: the objective is already missed for this period).",
        ),
    ]
    return tuple(s for s in (*steps, traffic_step) if s)


def _traffic_query(slo: Any, window: str) -> str | None:
    sli = slo.sli
    if sli.total_query:
        return _with_window(sli.total_query, window)
    if sli.kind == "latency" and sli.histogram:
        by = f" by ({', '.join(slo.group_by)})" if slo.group_by else ""
        matchers = _matchers(sli.selector or {})
        selector = f"{sli.histogram}_count{{{matchers}}}" if matchers else f"{sli.histogram}_count"
        return f"sum{by} (rate({selector}[{window}]))"
    return None


def _alert_window(alert: Any) -> str:
    """The window the diagnosis queries use: the alert's shortest window (or the one its expression reads)."""
    if alert.windows:
        return alert.windows[0].short
    match = _RATE_WINDOW_RE.search(alert.expr)
    return match.group(1) if match else DEFAULT_WINDOW


def source_name(source: str) -> str:
    """The spec file as the runbooks cite it: its name, so the output does not depend on where it is built."""
    return Path(source).name


def build_page(
    alert: Any,
    slo: Any,
    knowledge: Knowledge,
    grafana_url: str,
    siblings: Sequence[Any] = (),
    panel_titles: Mapping[tuple[str, int], str] | None = None,
    stages: StageCatalog = STAGES,
    catalog_source: str | None = None,
) -> Page:
    """Assemble the runbook of one alert of a compiled SLO (``stages``: the stage catalog it was compiled with,
    read from ``catalog_source`` when not the built-in one).

    ``panel_titles`` (``llmpath.dashboards.panel_directory``) names the generated dashboards' panels by
    ``(dashboard key, panel id)``; a knowledge panel reference missing from it is an error (the link would open
    nothing).
    """
    stage = alert.labels.get("stage") or slo.stage
    entry = knowledge.entry(stage)
    severity = alert.severity
    window = _alert_window(alert)
    variables = _fixed_variables(slo)
    owner = alert.labels.get("owner") or slo.owner or catalog_owner(stage, stages)
    stage_links = tuple(_panel_link(ref, grafana_url, variables, panel_titles) for ref in entry.panels)
    return Page(
        alert=alert,
        slo=slo,
        severity=severity,
        response=RESPONSE.get(severity, "handle as your team's policy for this severity says"),
        stage=stage,
        stage_title=entry.title,
        stage_meaning=stage_meaning(stage, knowledge, stages),
        stage_position=stage_position(stage, stages),
        owner=markdown.text(owner) if owner else "unowned (an llmpath/v1 spec names it with `stage:` or `owner:`)",
        window=window,
        windows=_window_rows(alert, slo),
        sli_lines=_sli_lines(slo, window),
        source=source_name(slo.source),
        grouping=tuple(slo.group_by),
        budget_link=Link("burn rate of this SLO", panel_url(grafana_url, "slos", burn_panel_key(slo.id), variables)),
        stage_links=stage_links,
        reality=_reality_checks(alert, slo, window),
        knowledge=entry,
        steps=_steps(entry, window),
        path_steps=_steps(knowledge.path, window) if stage is not None else (),
        related=tuple(RelatedAlert(a.name, a.severity, a.runbook_file) for a in siblings if a is not alert),
        catalog_source=catalog_source,
    )
