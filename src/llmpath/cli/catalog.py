"""The ``--catalog`` option shared by the commands that read the stage catalog (slo, dashboards, runbooks, usage)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from llmpath.instrumentation import StageCatalog

CATALOG_HELP = (
    "Stage catalog file (TOML: owners of the built-in stages, your own stages), the one the gateway passes to "
    "instrument_app(catalog=load_catalog(...)). Default: the built-in stages and owners."
)


def catalog_or_exit(path: Path | None) -> StageCatalog:
    """The catalog in ``path`` (the built-in one without a path); an unreadable or invalid file exits 2, saying why."""
    from llmpath.instrumentation import STAGES, CatalogFileError, load_catalog

    if path is None:
        return STAGES
    try:
        return load_catalog(path)
    except CatalogFileError as exc:
        typer.echo(f"llmpath: --catalog {exc}", err=True)
        raise typer.Exit(2) from None
    except UnicodeDecodeError as exc:
        typer.echo(f"llmpath: --catalog {path}: not UTF-8 text (byte at offset {exc.start})", err=True)
        raise typer.Exit(2) from None
    except RecursionError:  # tomllib parses nested arrays recursively
        typer.echo(f"llmpath: --catalog {path}: not valid TOML: arrays or tables nested too deeply", err=True)
        raise typer.Exit(2) from None
