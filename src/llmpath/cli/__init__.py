"""The ``llmpath`` command line. Each part owns one sub-command module in this package."""

import typer

from llmpath.cli import dashboards, demo, engine, gateway, runbooks, slo, usage

app = typer.Typer(
    help="llmpath: observability and SLOs for the seven stages of an LLM API request.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(engine.app, name="engine")
app.add_typer(gateway.app, name="gateway")
app.add_typer(slo.app, name="slo")
app.add_typer(dashboards.app, name="dashboards")
app.add_typer(runbooks.app, name="runbooks")
app.add_typer(usage.app, name="usage")
app.add_typer(demo.app, name="demo")


def main() -> None:
    """Console-script entry point."""
    app()
