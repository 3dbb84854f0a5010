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
app.command("demo")(demo.demo)

#: The distributions of the platform, in the order of the request path's dependencies.
PARTS = (
    "llmpath",
    "llmpath-instrumentation",
    "llmpath-backends",
    "llmpath-gateway",
    "llmpath-slo",
    "llmpath-dashboards",
    "llmpath-runbooks",
)


def _show_version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    for name in PARTS:
        try:
            typer.echo(f"{name} {version(name)}")
        except PackageNotFoundError:
            typer.echo(f"{name} (not installed)")
    raise typer.Exit()


@app.callback()
def _root(
    show_version: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True, help="Print the installed parts' versions and exit."
    ),
) -> None:
    """llmpath: observability and SLOs for the seven stages of an LLM API request."""


def main() -> None:
    """Console-script entry point."""
    app()
