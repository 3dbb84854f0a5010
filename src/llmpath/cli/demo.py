"""`llmpath demo`: Run the whole loop on the embedded default."""

import typer

app = typer.Typer(help="Run the whole loop on the embedded default.", no_args_is_help=True)
