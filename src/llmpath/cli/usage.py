"""`llmpath usage`: read the usage ledger (JSON lines or SQLite) the instrumentation writes, one record per request."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from llmpath.cli.catalog import CATALOG_HELP, catalog_or_exit
from llmpath.cli.tables import print_table

app = typer.Typer(
    help="Read usage ledgers: a summary, the slowest requests stage by stage, one request's timeline.",
    no_args_is_help=True,
)

LEDGERS = typer.Argument(..., help="Ledger files (JSON lines or SQLite), read in order.", show_default=False)
SINCE = typer.Option(None, "--since", help="Only requests that started this long ago or later, e.g. 15m, 1h, 2d.")
ROUTE = typer.Option(None, "--route", help="Only this route.")
TENANT = typer.Option(None, "--tenant", help="Only this tenant.")
MODEL = typer.Option(None, "--model", help="Only this model.")
STATUS = typer.Option(None, "--status", help="Only this status code (503) or class (5xx, 4xx).")
JSON = typer.Option(False, "--json", help="Machine-readable JSON instead of tables.")
#: What tables and JSON show in place of a missing trace id, copied as if it were one.
NO_ID = frozenset({"–", "-", "None", "null"})
CATALOG = typer.Option(None, "--catalog", help=CATALOG_HELP)
PRICES = typer.Option(
    None,
    "--prices",
    help="Token prices per model (TOML): adds cost and what the prompt cache saved, by tenant and route.",
)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"llmpath usage: {message}", err=True)
    return typer.Exit(2)


def _records(
    ledgers: list[Path],
    since: str | None,
    route: str | None,
    tenant: str | None,
    model: str | None,
    status: str | None = None,
) -> Iterator[Any]:
    """The matching records of every ledger, read as they are consumed (a bad option exits 2 at once; a bad file
    when it is reached)."""
    from promql_parser import parse_duration

    from llmpath.ledger.summary import status_filter

    cutoff = None
    if since is not None:
        try:
            cutoff = time.time() - parse_duration(since).total_seconds()
        except ValueError:
            raise _fail(f"--since {since!r}: not a duration (use e.g. 30s, 15m, 1h, 2d)") from None
    if status is not None:
        try:
            status_filter(status)
        except ValueError:
            raise _fail(f"--status {status!r}: use a status code (503) or a class (5xx)") from None
    _refuse_repeated(ledgers)
    return _read(ledgers, cutoff, route, tenant, model, status)


def _refuse_repeated(ledgers: list[Path]) -> None:
    """One file given twice (as ``a.jsonl`` and ``./a.jsonl``, or through a link) would count its records twice."""
    seen: dict[tuple[int, int], Path] = {}
    for path in ledgers:
        try:
            st = path.stat()
        except OSError:
            continue  # said when it is read
        first = seen.setdefault((st.st_dev, st.st_ino), path)
        if first is not path:
            raise _fail(f"{path}: the same file as {first}, given before: its records would count twice")


def _read(
    ledgers: list[Path],
    cutoff: float | None,
    route: str | None,
    tenant: str | None,
    model: str | None,
    status: str | None,
) -> Iterator[Any]:
    from llmpath.instrumentation import LedgerFormatError
    from llmpath.ledger import read_ledger, select

    for path in ledgers:
        try:
            yield from select(read_ledger(path, cutoff), route=route, tenant=tenant, model=model, status=status)
        except LedgerFormatError as exc:
            raise _fail(str(exc)) from None
        except OSError as exc:
            raise _fail(f"{path}: {exc.strerror or exc}") from None


@app.command()
def summary(
    ledgers: list[Path] = LEDGERS,
    since: str | None = SINCE,
    route: str | None = ROUTE,
    tenant: str | None = TENANT,
    model: str | None = MODEL,
    status: str | None = STATUS,
    as_json: bool = JSON,
    catalog: Path | None = CATALOG,
    prices: Path | None = PRICES,
) -> None:
    """Requests, errors, TTFT, where the time goes per stage, latency and errors per route, prompt-cache hit rate
    per route, tokens per tenant.

    TTFT (the headline and per route), the stages and the prompt cache cover the requests that got a first token,
    whatever their final status (a stream cut off after its first token, e.g. a 499, counts; a 429 does not), like
    the TTFT histogram; "–" (null in --json) where none did. Stages no such request has are left out.
    """
    from rich.console import Console
    from rich.text import Text

    from llmpath.ledger import PriceFileError, load_prices, summarize
    from llmpath.ledger.render import (
        cache_table,
        cost_tables,
        headline,
        route_table,
        stage_table,
        tenant_table,
        unpriced_line,
        when,
    )

    stages = catalog_or_exit(catalog)
    try:
        price_list = load_prices(prices) if prices is not None else None
    except PriceFileError as exc:
        raise _fail(f"--prices {exc}") from None
    result = summarize(_records(ledgers, since, route, tenant, model, status), stages, price_list)
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(result), indent=2))
        return
    console = Console()
    if not result.requests:
        console.print("no requests match")
        return
    console.print(headline(result))
    statuses = ", ".join(f"{code}: {n}" for code, n in result.statuses.items())
    console.print(f"from {when(result.first_time)} to {when(result.last_time)}; status codes {statuses}")
    if not result.stages:
        console.print("no stage timings: none of these requests got a first token")
    for part in (stage_table(result), route_table(result), cache_table(result), tenant_table(result)):
        if part.row_count:
            print_table(console, part)
    for part in cost_tables(result):
        print_table(console, part)
    if (line := unpriced_line(result)) is not None:
        console.print(Text(line, style="yellow"))


@app.command()
def slowest(
    ledgers: list[Path] = LEDGERS,
    count: int = typer.Option(10, "--count", "-n", min=1, help="How many requests."),
    by: str = typer.Option(
        "ttft",
        "--by",
        help="ttft (requests that got a first token): the columns are the stages before the first token and "
        "unattributed, adding up to TTFT. duration: every stage (decode too), unattributed and untracked (time in "
        "no stage after the first token, or in no stage at all without one), adding up to the duration. Stages that "
        "overlap add up to more.",
    ),
    since: str | None = SINCE,
    route: str | None = ROUTE,
    tenant: str | None = TENANT,
    model: str | None = MODEL,
    status: str | None = STATUS,
    as_json: bool = JSON,
) -> None:
    """The slowest requests with the time (ms) each stage took: which stage made them slow, and their trace ids."""
    from rich.console import Console

    from llmpath.ledger import slowest as pick
    from llmpath.ledger.render import slowest_table

    if by not in ("ttft", "duration"):
        raise _fail(f"--by {by!r}: use ttft or duration")
    records = pick(_records(ledgers, since, route, tenant, model, status), count, by=by)
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in records], indent=2))
        return
    console = Console()
    if records:
        print_table(console, slowest_table(records, by))
    else:
        console.print("no requests match")


@app.command()
def show(
    ident: str = typer.Argument(..., help="A request id (x-request-id) or a trace id.", show_default=False),
    ledgers: list[Path] = LEDGERS,
    as_json: bool = JSON,
) -> None:
    """One request's record and stage timeline, found by request id or trace id (exit code 1 if none)."""
    from rich.console import Console

    from llmpath.ledger import find
    from llmpath.ledger.render import record_header, record_table

    if not ident.strip() or ident.strip() in NO_ID:  # an empty id matched every request without a trace id
        raise _fail(f"{ident!r} is no id: where a request has no trace id (no tracing SDK), show it by request id")
    found = find(_records(ledgers, None, None, None, None), ident)
    if not found:
        typer.echo(f"llmpath usage: no request or trace {ident!r} in {', '.join(map(str, ledgers))}", err=True)
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in found], indent=2))
        return
    console = Console()
    for r in found:
        for line in record_header(r):
            console.print(line)
        print_table(console, record_table(r))
