"""`llmpath dashboards`: Generate Grafana dashboards."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from llmpath.cli.catalog import CATALOG_HELP, catalog_or_exit
from llmpath.cli.slo import BUCKETS_HELP, PLUGINS_HELP, load_plugins, parse_buckets, spec_failure
from llmpath.cli.urls import check_http_url

if TYPE_CHECKING:
    from llmpath.instrumentation import StageCatalog

app = typer.Typer(help="Generate Grafana dashboards.", no_args_is_help=True)

SLO_HELP = "SLO spec file or folder (repeatable). Default: the spec packaged with llmpath (llmpath slo init)."
PERIOD_HELP = "SLO period, as for `llmpath slo compile` (30d, 28d, 7d; any duration with --windows)."
WINDOWS_HELP = "Sloth AlertWindows file or folder for a custom period (repeatable), as for `llmpath slo compile`."
CHECK_HELP = "Write nothing; exit 1 and name each file in OUT that is missing, out of date or no longer generated."


@dataclass(frozen=True)
class SpecArgs:
    """The options that say which SLO specs to compile and how, shared by `dashboards build`, `dashboards lint`
    and `runbooks build` (the same as `llmpath slo compile`'s)."""

    slo: list[Path] | None
    period: str | None
    windows: list[Path]
    buckets: list[str]
    plugins: list[str]
    catalog: Path | None

    def stages(self) -> StageCatalog:
        """The stage catalog (``--catalog``); an invalid file exits 2."""
        return catalog_or_exit(self.catalog)

    def compile(self, stages: StageCatalog, **urls: str | None) -> Any:
        """Compile the specs (the default one when none are given); an invalid spec exits 1 with every problem
        (as ``llmpath slo compile`` does), a bad option 2."""
        from llmpath.dashboards.specs import SpecOptions, compile_specs
        from llmpath.slo import SpecError

        sli_plugins, slo_plugins = load_plugins(self.plugins)
        options = SpecOptions(
            tuple(self.slo or ()),
            self.period,
            tuple(self.windows) or None,
            **urls,
            histogram_buckets=parse_buckets(self.buckets),
            stages=stages,
            sli_plugins=sli_plugins,
            slo_plugins=slo_plugins,
        )
        try:
            return compile_specs(options)
        except SpecError as exc:
            spec_failure(exc)

    def flags(self) -> str:
        """These options as command-line flags (for a command line that regenerates the same output)."""
        flags = [*(f" --slo {p}" for p in self.slo or ())]
        flags += [f" --period {self.period}"] if self.period else []
        flags += [*(f" --windows {w}" for w in self.windows), *(f" --buckets {b}" for b in self.buckets)]
        flags += [*(f" --plugins {p}" for p in self.plugins)]
        return "".join(flags) + (f" --catalog {self.catalog}" if self.catalog else "")


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``message`` to stderr and return the exit to raise."""
    typer.echo(message, err=True)
    return typer.Exit(code)


def sync(out: Path, files: dict[str, str], check: bool, is_generated, what: str, command: str) -> None:
    """Write ``files`` into ``out``, or with ``check`` verify that ``out`` already holds exactly them."""
    from llmpath.dashboards.outputs import drift, write

    if out.exists() and not out.is_dir():
        raise fail(f"--out {out}: exists and is not a folder", 2)
    if check:
        stale = drift(out, files, is_generated)
        if stale:
            lines = "\n".join(stale.describe(out))
            raise fail(f"{lines}\n{what} in {out} are stale; regenerate with: {command}")
        typer.echo(f"{out}: {len(files)} {what} up to date")
        return
    try:
        changed = write(out, files, is_generated)
    except OSError as exc:  # a file in its path, no permission, a full disk
        raise fail(f"--out {out}: cannot write: {exc.strerror or exc}", 2) from None
    typer.echo(f"{out}: {len(files)} {what} ({len(changed.missing) + len(changed.changed)} written, "
               f"{len(changed.extra)} removed)")  # fmt: skip


@app.command("build")
def build(
    out: Path = typer.Option(..., "-o", "--out", help="Output folder for the dashboard JSON files."),
    slo: list[Path] | None = typer.Option(None, "--slo", help=SLO_HELP),
    check: bool = typer.Option(False, "--check", help=CHECK_HELP),
    period: str | None = typer.Option(None, "--period", "-p", help=PERIOD_HELP),
    windows: list[Path] = typer.Option([], "--windows", "-w", help=WINDOWS_HELP),
    buckets: list[str] = typer.Option([], "--buckets", help=BUCKETS_HELP),
    plugins: list[str] = typer.Option([], "--plugins", help=PLUGINS_HELP),
    catalog: Path | None = typer.Option(None, "--catalog", help=CATALOG_HELP),
    runbook_base_url: str | None = typer.Option(
        None,
        "--runbook-base-url",
        help="Where the runbooks are published (the URL given to `llmpath slo compile`): each SLO's burn-rate panel "
        "then links to the runbooks of its alerts. An absolute http(s) URL.",
    ),
) -> None:
    """Build the LLM API path, SLOs and Backends dashboards (Grafana JSON) into OUT.

    Every dashboard is checked before anything is written: Grafana's JSON schema, unique stable panel ids, units
    and descriptions, and every query parsed with its metrics and labels checked against the stage catalog, the
    engine's metrics and the SLO recording rules.
    """
    from llmpath.dashboards.build import DashboardError, build_dashboards, is_generated, render_all
    from llmpath.dashboards.specs import recording_rule_names, slo_views

    check_http_url(runbook_base_url, "--runbook-base-url")  # Grafana opens panel links from its own pages
    specs = SpecArgs(slo, period, windows, buckets, plugins, catalog)
    stages = specs.stages()
    result = specs.compile(stages, runbook_base_url=runbook_base_url)
    try:
        dashboards = build_dashboards(slo_views(result.slos), recording_rule_names(result.files.values()), stages)
    except DashboardError as exc:
        raise fail(str(exc)) from None
    url = f" --runbook-base-url {runbook_base_url}" if runbook_base_url else ""
    command = "llmpath dashboards build" + specs.flags() + url + f" -o {out}"
    sync(out, render_all(dashboards), check, is_generated, "dashboard files", command)


@app.command("lint")
def lint(
    files: list[Path] = typer.Argument(..., help="Dashboard JSON files (e.g. edited copies of the generated ones)."),
    slo: list[Path] | None = typer.Option(None, "--slo", help=SLO_HELP + " Their recording rules count as known."),
    period: str | None = typer.Option(None, "--period", "-p", help=PERIOD_HELP),
    windows: list[Path] = typer.Option([], "--windows", "-w", help=WINDOWS_HELP),
    buckets: list[str] = typer.Option([], "--buckets", help=BUCKETS_HELP),
    plugins: list[str] = typer.Option([], "--plugins", help=PLUGINS_HELP),
    catalog: Path | None = typer.Option(None, "--catalog", help=CATALOG_HELP),
) -> None:
    """Check dashboard JSON files with the checks `build` applies (schema, ids, units, queries, metric names);
    give the spec options `build` was given, so that the same recording rules are known."""
    import json

    from llmpath.dashboards import dashboard_problems, known_metric_names
    from llmpath.dashboards.specs import recording_rule_names

    specs = SpecArgs(slo, period, windows, buckets, plugins, catalog)
    known = known_metric_names(recording_rule_names(specs.compile(specs.stages()).files.values()))
    problems = []
    for path in files:
        try:
            dashboard = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            problems.append(f"{path}: {exc}")
            continue
        problems.extend(f"{path}: {p}" for p in dashboard_problems(dashboard, known))
    if problems:
        raise fail("\n".join(problems))
    typer.echo(f"{len(files)} dashboard(s) OK")
