"""llmpath dashboards: Grafana dashboards generated with grafanalib from the stage catalog and SLO specs.

``build_dashboards`` returns the three dashboards (LLM API path, SLOs, Backends) as checked Grafana JSON;
``queries`` extracts every query of a dashboard with Grafana variables substituted (for running them against
Prometheus); ``dashboard_problems`` / ``expression_problems`` are the checks the build applies.
"""

from llmpath.dashboards.build import (
    DashboardError,
    build_dashboards,
    file_name,
    panel_directory,
    render,
    render_all,
)
from llmpath.dashboards.checks import (
    PromQLError,
    dashboard_problems,
    expand,
    expression_problems,
    known_metric_names,
    metric_names,
    queries,
    variable_defaults,
)
from llmpath.dashboards.slos import SloView, burn_panel_id, burn_panel_key

__all__ = [
    "DashboardError",
    "PromQLError",
    "SloView",
    "build_dashboards",
    "burn_panel_id",
    "burn_panel_key",
    "dashboard_problems",
    "expand",
    "expression_problems",
    "file_name",
    "known_metric_names",
    "metric_names",
    "panel_directory",
    "queries",
    "render",
    "render_all",
    "variable_defaults",
]
