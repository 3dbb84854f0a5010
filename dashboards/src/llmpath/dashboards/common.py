"""What the three dashboards share: template variables, cross-links, the SLO-alert annotation, assembly."""

from __future__ import annotations

import re
from collections.abc import Sequence

from grafanalib.core import Annotations, Dashboard, DashboardLink, Template, Templating, Time

from llmpath.dashboards.grafana import DATASOURCE_REF
from llmpath.dashboards.panels import Board
from llmpath.instrumentation import catalog

TAG = "llmpath"
#: The value of a multi-value variable's "All": ``.*`` also matches series without the label (e.g. SLOs that are
#: not grouped by route), where ``.+`` would hide them.
ALL = ".*"

#: What Grafana reads as a variable in titles, descriptions and legends (``$x``, ``${x}``, ``[[x]]``) or, in a legend,
#: as a label (``{{x}}``).
_GRAFANA_SYNTAX = re.compile(r"(\$|\[(?=\[)|\{(?=\{))")
#: U+2060 WORD JOINER: invisible, and it breaks the variable syntax it is put into.
WORD_JOINER = "\u2060"

#: Sample values of the dashboard variables, used to parse queries while building.
SAMPLE_VARIABLES = {"datasource": "prometheus", "route": ALL, "model": ALL}


def literal(text: str) -> str:
    """Free text from a spec or the stage catalog (an owner, a description) for a panel title, description or
    legend, shown as written: Grafana interpolates ``$route``, ``${model}``, ``[[route]]`` and legend ``{{label}}``
    there, so each such opening gets an invisible word joiner (``$route-oncall`` stays that, not ``All-oncall``)."""
    return _GRAFANA_SYNTAX.sub(r"\1" + WORD_JOINER, text)


def datasource_variable() -> Template:
    """The ``datasource`` variable every panel and query binds to (dashboard-linter's naming)."""
    return Template(name="datasource", label="Data source", query="prometheus", type="datasource", refresh=1)


def label_variable(name: str, label: str, selector: str, source_label: str | None = None) -> Template:
    """A multi-value query variable with "All" (``allValue`` :data:`ALL`), sorted, refreshed on time-range change."""
    return Template(
        name=name,
        label=label,
        query=f"label_values({selector}, {source_label or name})",
        dataSource="${datasource}",
        includeAll=True,
        multi=True,
        allValue=ALL,
        refresh=2,
        sort=1,
    )


def llmpath_variables(*, model: bool = True) -> Templating:
    """datasource, route and (unless ``model=False``) model, read from the gateway's request counter."""
    variables = [datasource_variable(), label_variable("route", "Route", catalog.REQUESTS_TOTAL)]
    if model:
        variables.append(label_variable("model", "Model", f'{catalog.REQUESTS_TOTAL}{{route=~"$route"}}'))
    return Templating(list=variables)


def slo_alert_annotations() -> Annotations:
    """Marks firing llmpath/Sloth SLO alerts on every time-series panel."""
    return Annotations(
        list=[
            {
                "name": "SLO alerts",
                "datasource": dict(DATASOURCE_REF),
                "enable": True,
                "iconColor": "red",
                "expr": 'ALERTS{alertstate="firing", sloth_id!=""}',
                "titleFormat": "{{alertname}} ({{sloth_severity}})",
                "textFormat": "stage {{stage}}, owner {{owner}}",
                "tagKeys": "sloth_severity,stage,owner",
                "step": "1m",
                "useValueForTime": False,
            }
        ]
    )


def dashboard(
    key: str, title: str, description: str, board: Board, templating: Templating, tags: Sequence[str] = ()
) -> Dashboard:
    """A grafanalib dashboard with llmpath's uid, tags, cross-links, time range and refresh."""
    return Dashboard(
        title=title,
        uid=catalog.DASHBOARD_UIDS[key],
        description=description,
        tags=[TAG, *tags],
        panels=board.panels,
        templating=templating,
        annotations=slo_alert_annotations(),
        links=[
            DashboardLink(
                title="llmpath dashboards",
                type="dashboards",
                tags=[TAG],
                asDropdown=True,
                includeVars=True,
                keepTime=True,
                icon="external link",
                tooltip="Other llmpath dashboards, keeping the time range and variables",
            )
        ],
        time=Time("now-1h", "now"),
        refresh="30s",
        timezone="browser",
    )
