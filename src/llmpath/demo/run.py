"""``llmpath demo``: start the stack, drive the workload with a progress bar, print the report, keep serving."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from llmpath.demo.prometheus import PrometheusServer
from llmpath.demo.routes import DEMO_ROUTES
from llmpath.demo.stack import Stack, StackConfig, start_stack
from llmpath.demo.supervisor import Interrupted, Supervisor, run_async, stop_signals
from llmpath.demo.workload import WorkloadSpec, planned_requests, run_workload, warm_up
from llmpath.instrumentation.usage import read_jsonl
from llmpath.ledger import LedgerSummary, summarize
from llmpath.ledger.render import cache_table, headline, stage_table, tenant_table
from llmpath.live.promapi import PrometheusError
from llmpath.live.slo_status import SloRow, slo_status, status_table

#: How long the warm-up waits for Prometheus to scrape its requests.
WARM_UP_SCRAPE_TIMEOUT_S = 30.0
#: How long a failed request waits for the watchdog to name a child that died (it polls every 0.2 s).
WATCHDOG_GRACE_S = 1.0
#: Columns the report needs without truncating a cell.
REPORT_WIDTH = 110


@dataclass
class DemoOptions:
    workdir: Path
    duration_s: float = 90.0
    once: bool = False
    preset: str = "small"
    conversations: int = 36
    concurrency: int = 4
    max_tokens: int = 16


def run_demo(opts: DemoOptions, console: Console | None = None) -> LedgerSummary:
    """Run the demo end to end; returns the ledger summary it printed."""
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or logged: rich would wrap the tables at 80 columns
            console.width = max(console.width, REPORT_WIDTH)
    started = time.perf_counter()
    cfg = StackConfig(workdir=opts.workdir, preset=opts.preset, on_step=lambda msg: console.print(f"[dim]• {msg}[/]"))
    with (
        workdir_lock(opts.workdir),
        stop_signals(),
        start_stack(cfg) as stack,
        _lost_contact_is_an_error(stack.supervisor),
    ):
        return _run(opts, cfg, stack, console, started)


def _run(opts: DemoOptions, cfg: StackConfig, stack: Stack, console: Console, started: float) -> LedgerSummary:
    for skipped in stack.skipped:
        console.print(f"[yellow]skipped:[/] {skipped}")
    spec = WorkloadSpec(
        routes=[r.name for r in DEMO_ROUTES],
        tenants=stack.tenants,
        conversations=opts.conversations,
        concurrency=opts.concurrency,
        max_tokens=opts.max_tokens,
    )
    if stack.prometheus is not None:
        _warm_up(stack, stack.prometheus, spec, console)
    _drive(stack, spec, opts.duration_s, console)
    if stack.prometheus is not None:
        _wait_for_rules(stack.prometheus, cfg)
    summary = summarize(read_jsonl(stack.ledger_path))
    slo_rows = _slo_rows(stack)
    print_report(console, summary, slo_rows, stack)
    console.print(f"[dim]demo took {time.perf_counter() - started:.0f} s[/]")
    if not opts.once:
        _serve_until_interrupted(console)
    return summary


@contextmanager
def _lost_contact_is_an_error(supervisor: Supervisor) -> Iterator[None]:
    """A request to a child that just died: the child is named (:class:`ChildDied`, raised from the report, or from
    the watchdog's while this waits for it); otherwise a one-line error instead of a traceback."""
    try:
        yield
    except (httpx.HTTPError, PrometheusError) as exc:  # the Prometheus client words its transport errors itself
        supervisor.report_dead_child()
        time.sleep(WATCHDOG_GRACE_S)
        raise LostContact(f"lost contact with a demo server ({type(exc).__name__}: {exc})") from None


class LostContact(RuntimeError):
    """A request to one of the demo's servers failed at the transport level."""


class WorkdirBusy(RuntimeError):
    """Another demo is running in the same work folder."""


@contextmanager
def workdir_lock(workdir: Path) -> Iterator[None]:
    """Hold ``workdir/.demo.lock`` for the whole run: a second demo there would clobber the ledger, the logs and
    Prometheus's data (the lock goes with the process, however it ends)."""
    with (workdir / ".demo.lock").open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip() or "?"
            raise WorkdirBusy(
                f"another llmpath demo (pid {owner}) is using {workdir}; stop it, or pass another --workdir"
            ) from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield


def _drive(stack: Stack, spec: WorkloadSpec, duration_s: float, console: Console) -> None:
    total = planned_requests(spec)
    columns = (TextColumn("workload"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[errors]} errors"))
    with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("requests", total=total, errors=0)
        errors = 0

        def on_request(res) -> None:  # noqa: ANN001 - RequestResult
            nonlocal errors
            errors += res.status != 200
            progress.update(task, advance=1, errors=errors)

        result = run_async(run_workload(stack.gateway_url, spec, on_request=on_request, deadline_s=duration_s))
    console.print(
        f"sent {len(result.requests)} requests in {result.wall_s:.1f} s "
        f"({len(result.requests) / max(result.wall_s, 1e-9):.1f} req/s), {result.failures} failed"
    )


def _warm_up(stack: Stack, prometheus: PrometheusServer, spec: WorkloadSpec, console: Console) -> None:
    """Create every route/tenant series and wait until Prometheus has scraped them (see ``warm_up``)."""
    console.print("[dim]• warming up: one request per route and tenant, scraped before the load[/]")
    results = run_async(warm_up(stack.gateway_url, spec))
    if failed := [r for r in results if r.status != 200]:
        console.print(f"[yellow]warm-up: {len(failed)} of {len(results)} requests failed ({failed[0].error})")
    deadline = time.monotonic() + WARM_UP_SCRAPE_TIMEOUT_S
    with prometheus.client() as client:
        while (client.query_value("sum(llmpath_requests_total)") or 0) < len(results):
            if time.monotonic() > deadline:
                console.print("[yellow]warm-up: Prometheus has not scraped the gateway yet; SLIs may lag")
                return
            time.sleep(0.25)


def _wait_for_rules(prometheus: PrometheusServer, cfg: StackConfig) -> None:
    """Let Prometheus scrape the last requests and evaluate the rules over them."""
    from promql_parser import parse_duration

    cycle = sum(parse_duration(d).total_seconds() for d in (cfg.scrape_interval, cfg.evaluation_interval))
    with prometheus.client() as client:
        client.wait_for_evaluation(time.time(), timeout=4 * cycle + 10)


def _slo_rows(stack: Stack) -> list[SloRow] | None:
    if stack.prometheus is None:
        return None
    with stack.prometheus.client() as client:
        return slo_status(client)


def print_report(console: Console, summary: LedgerSummary, slo_rows: list[SloRow] | None, stack: Stack) -> None:
    """The report as rich tables."""
    console.print()
    console.rule("[bold]llmpath demo report")
    console.print(headline(summary))
    for part in (stage_table(summary), cache_table(summary), tenant_table(summary)):
        console.print(part)

    if slo_rows is None:
        console.print("[yellow]SLO status skipped: Prometheus is not running (see above).")
    else:
        console.print(status_table(slo_rows))

    art = stack.artifacts
    console.print(f"rules:      {art.rules_dir}\ndashboards: {art.dashboards_dir}\nrunbooks:   {art.runbooks_dir}")
    console.print(f"ledger:     {stack.ledger_path}  (read it: llmpath usage summary|slowest {stack.ledger_path})",
                  soft_wrap=True)  # fmt: skip
    if stack.prometheus is not None:
        url = stack.prometheus.url
        console.print(f"Prometheus: {url}/alerts  (or: llmpath slo status --prometheus {url})", soft_wrap=True)
    console.print(
        f"waterfall:  {stack.gateway_url}/debug/requests  (browser login: any user name, password = the demo "
        f"admin key {stack.admin_key})"
    )


def _serve_until_interrupted(console: Console) -> None:
    """Serve until Ctrl-C, SIGTERM or SIGHUP (the documented way to end: exit status 0); a child that dies
    meanwhile still ends the demo with an error (:class:`ChildDied` propagates)."""
    console.print("[bold]serving until Ctrl-C[/] (run with --once to exit after the report)")
    try:
        while True:
            time.sleep(3600)
    except Interrupted:
        console.print("stopping…")
