"""Deep links into the generated dashboards: ``<grafana>/d/<uid>?viewPanel=<stable id>&var-route=…``."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import quote

from llmpath.instrumentation.catalog import DASHBOARD_UIDS, stable_panel_id

#: Grafana's URL value for a variable's "All" option.
ALL = "$__all"
#: The label variables each generated dashboard defines (``DASHBOARD_UIDS`` keys); a link sets only these.
DASHBOARD_VARIABLES: Mapping[str, tuple[str, ...]] = {
    "api_path": ("route", "model"),
    "backends": ("route", "model"),
    "slos": ("route",),  # SLO series carry no model label
}


def panel_url(base_url: str, dashboard: str, panel_key: str, variables: Mapping[str, str] | None = None) -> str:
    """URL opening one panel of a generated dashboard (``dashboard`` is a ``DASHBOARD_UIDS`` key) with variables set
    (those the dashboard does not define are left out).

    ``/d/<uid>`` without the slug is valid: Grafana redirects to the canonical URL and keeps the query string.
    """
    known = DASHBOARD_VARIABLES[dashboard]
    query = [f"viewPanel={stable_panel_id(panel_key)}"]
    query += [f"var-{name}={quote(value, safe='$')}" for name, value in (variables or {}).items() if name in known]
    return f"{base_url.rstrip('/')}/d/{DASHBOARD_UIDS[dashboard]}?{'&'.join(query)}"


def parse_panel_ref(ref: str) -> tuple[str, str]:
    """``"api_path/stage:prefill:latency"`` → ``("api_path", "stage:prefill:latency")``; ``ValueError`` if malformed."""
    dashboard, sep, panel_key = ref.partition("/")
    if not sep or dashboard not in DASHBOARD_UIDS or not panel_key:
        raise ValueError(f"panel reference {ref!r} must be '<{'|'.join(DASHBOARD_UIDS)}>/<panel key>'")
    return dashboard, panel_key
