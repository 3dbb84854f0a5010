"""`llmpath runbooks`: Generate per-alert runbooks."""

from __future__ import annotations

from pathlib import Path

import typer

from llmpath.cli.catalog import CATALOG_HELP
from llmpath.cli.dashboards import CHECK_HELP, PERIOD_HELP, SLO_HELP, WINDOWS_HELP, SpecArgs, fail, sync
from llmpath.cli.slo import BUCKETS_HELP, PLUGINS_HELP
from llmpath.cli.urls import check_http_url

app = typer.Typer(help="Generate per-alert runbooks.", no_args_is_help=True)

DEFAULT_GRAFANA_URL = "http://localhost:3000"


@app.command("build")
def build(
    out: Path = typer.Option(..., "-o", "--out", help="Output folder for the runbooks and their index (README.md)."),
    slo: list[Path] | None = typer.Option(None, "--slo", help=SLO_HELP),
    check: bool = typer.Option(False, "--check", help=CHECK_HELP),
    period: str | None = typer.Option(None, "--period", "-p", help=PERIOD_HELP),
    windows: list[Path] = typer.Option([], "--windows", "-w", help=WINDOWS_HELP),
    dashboard_base_url: str | None = typer.Option(
        None, "--dashboard-base-url", help=f"Grafana URL for dashboard links, http(s) (default: {DEFAULT_GRAFANA_URL})."
    ),
    buckets: list[str] = typer.Option([], "--buckets", help=BUCKETS_HELP),
    plugins: list[str] = typer.Option([], "--plugins", help=PLUGINS_HELP),
    catalog: Path | None = typer.Option(None, "--catalog", help=CATALOG_HELP),
) -> None:
    """Write one Markdown runbook per alert of the specs (file = the alert's runbook_file), plus an index mapping
    every alert to its owning stage and team."""
    from llmpath.dashboards import DashboardError, build_dashboards, panel_directory
    from llmpath.dashboards.specs import recording_rule_names, slo_views
    from llmpath.runbooks import KnowledgeError, RunbookError, build_runbooks, is_generated

    check_http_url(dashboard_base_url, "--dashboard-base-url")
    specs = SpecArgs(slo, period, windows, buckets, plugins, catalog)
    stages = specs.stages()
    result = specs.compile(stages, dashboard_base_url=dashboard_base_url)
    try:
        dashboards = build_dashboards(slo_views(result.slos), recording_rule_names(result.files.values()), stages)
        files = build_runbooks(
            result.slos,
            dashboard_base_url or DEFAULT_GRAFANA_URL,
            None,
            panel_directory(dashboards),
            stages,
            str(catalog) if catalog else None,
        )
    except (DashboardError, KnowledgeError, RunbookError) as exc:
        raise fail(str(exc)) from None
    url = f" --dashboard-base-url {dashboard_base_url}" if dashboard_base_url else ""
    command = "llmpath runbooks build" + specs.flags() + url + f" -o {out}"
    sync(out, files, check, is_generated, "runbook files", command)
