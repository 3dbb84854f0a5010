"""`llmpath slo`: compile, validate and start SLO specs (Sloth-compatible, plus LLM extensions)."""

from __future__ import annotations

import errno
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer

from llmpath.cli.catalog import CATALOG_HELP, catalog_or_exit
from llmpath.cli.urls import check_base_url_or_path, check_http_url

if TYPE_CHECKING:
    from llmpath.live.slo_status import SloRow
    from llmpath.slo import CompileOptions, CompileResult, SpecDocument, SpecError

app = typer.Typer(
    help="Compile Sloth-compatible SLO specs into Prometheus rules, validate them, or start from the default spec.",
    no_args_is_help=True,
)

_PERIOD_HELP = "Default SLO period: 30d, 28d or 7d built in; any Prometheus duration with a matching --windows file."
_WINDOWS_HELP = (
    "Sloth AlertWindows catalog (file or folder); adds or replaces the catalog for its period. "
    "With one file and no --period, its period is the default."
)
PLUGINS_HELP = "Python plugin file or module defining SLI_PLUGINS / SLO_PLUGINS (Sloth plugin ids); repeatable."
_DUPLICATES_HELP = "Allow the same SLO ID in different files (their rules must not be loaded into one Prometheus)."
BUCKETS_HELP = (
    "HISTOGRAM=BOUND,BOUND,… : the bucket bounds of a histogram whose buckets are not the catalog's (e.g. "
    "instrument_app(latency_buckets=...)); latency thresholds are checked against them. Repeatable."
)


_TIMEOUT_HELP = "Seconds to wait for each Prometheus request before giving up (env LLMPATH_PROMETHEUS_TIMEOUT)."
_TOKEN_HELP = (
    "File holding a bearer token for Prometheus (env LLMPATH_PROMETHEUS_TOKEN holds the token itself); basic "
    "auth goes in the URL (https://user:password@host). Never printed."
)
#: What reading Prometheus can raise besides PrometheusError: answers whose shape is not the API's.
_UNREADABLE = (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError)


def _token(token_file: Path | None) -> str | None:
    """The bearer token: the file's content (stripped), else LLMPATH_PROMETHEUS_TOKEN, else none."""
    if token_file is None:
        return os.environ.get("LLMPATH_PROMETHEUS_TOKEN") or None
    try:
        return token_file.read_text(encoding="utf-8").strip() or None
    except OSError as exc:
        raise typer.BadParameter(
            f"cannot read {token_file}: {exc.strerror or exc}", param_hint="--bearer-token-file"
        ) from None


#: Exit status of every command (slo compile/validate, dashboards build/lint, runbooks build) when a spec is
#: invalid; usage errors (a bad option) exit with 2.
SPEC_ERROR_EXIT = 1


def _err(text: str) -> None:
    typer.echo(text, err=True)


def _fail(lines: list[str], out: str | None = None) -> NoReturn:
    for line in lines:
        _err(line)
    suffix = f"; nothing was written to {out}" if out else ""
    _err(f"{len(lines)} error{'s' if len(lines) != 1 else ''}{suffix}.")
    raise typer.Exit(SPEC_ERROR_EXIT)


def spec_failure(exc: SpecError, strict: bool = False, out: str | None = None) -> NoReturn:
    """Print every problem of ``exc`` (its warnings too: as errors when ``strict``), grouped by file in line
    order, and exit with :data:`SPEC_ERROR_EXIT`."""
    issues = list(exc.issues) + ([w.as_error() for w in exc.warnings] if strict else [])
    if not strict:
        for warning in exc.warnings:
            _err(str(warning))
    files = list(dict.fromkeys(i.file for i in issues))
    issues.sort(key=lambda i: (files.index(i.file), i.line or 0, i.column or 0))
    _fail([str(i) for i in issues], out)


def _parse_labels(values: list[str]) -> dict[str, str]:
    labels = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--extra-label")
        labels[key] = value
    return labels


def parse_buckets(values: list[str]) -> dict[str, tuple[float, ...]]:
    """``--buckets HISTOGRAM=BOUND,BOUND,…`` options as histogram name → bounds (a usage error otherwise)."""
    buckets = {}
    for item in values:
        name, sep, bounds = item.partition("=")
        try:
            parsed = tuple(float(b) for b in bounds.split(",")) if sep and name and bounds else None
        except ValueError:
            parsed = None
        if parsed is None:
            raise typer.BadParameter(f"{item!r} is not HISTOGRAM=BOUND,BOUND,…", param_hint="--buckets")
        buckets[name] = parsed
    return buckets


def load_plugins(refs: list[str]) -> tuple[dict, dict]:
    """``--plugins`` modules' (SLI plugins, SLO plugins); one that cannot be used is a usage error (exit 2)."""
    from llmpath.slo.plugins import load_plugin_module

    sli: dict = {}
    slo: dict = {}
    for ref in refs:
        try:
            more_sli, more_slo = load_plugin_module(ref)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--plugins") from None
        sli.update(more_sli)
        slo.update(more_slo)
    return sli, slo


def _compile(inputs: list[Path], options: CompileOptions, out: str | None) -> CompileResult:
    return _compile_docs(_load(inputs, options, out), options, out)


def _load(inputs: list[Path], options: CompileOptions, out: str | None) -> list[SpecDocument]:
    """The spec documents of ``inputs``; invalid ones exit 1 with every problem.

    Warnings stay warnings here even with ``--strict``: the compile reports them as errors together with every
    other problem, instead of the first unknown key stopping the checks that follow.
    """
    from llmpath.slo import SpecError, load_specs

    try:
        return load_specs(inputs, strict=False)
    except SpecError as exc:
        spec_failure(exc, options.strict, out)


def _compile_docs(docs: list[SpecDocument], options: CompileOptions, out: str | None) -> CompileResult:
    """Compile loaded documents, printing the warnings; invalid ones exit 1 with every problem."""
    from llmpath.slo import SpecError, compile_slos

    try:
        result = compile_slos(docs, options)
    except SpecError as exc:
        spec_failure(exc, options.strict, out)
    for warning in result.warnings:
        _err(str(warning))
    return result


def write_atomically(out_dir: Path, files: dict[str, str]) -> None:
    """Write ``files`` (relative name → text) under ``out_dir`` all-or-nothing as far as the filesystem allows.

    Everything is written to a staging folder next to the targets first; only when every file is written are
    they renamed into place (a rename within one filesystem is atomic). A new ``out_dir`` appears in one rename.
    """
    out_dir = out_dir.resolve()
    fresh = not out_dir.exists()
    parent = out_dir.parent if fresh else out_dir
    parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    stage.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; a new output folder gets the usual permissions
    try:
        for name, text in files.items():
            target = stage / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        if fresh:
            stage.rename(out_dir)
            return
        for name in files:  # every destination first: a file or folder in the way fails before anything is replaced
            dest = out_dir / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.is_dir():
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(dest))
        for name in files:
            (stage / name).replace(out_dir / name)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def _refuse_to_replace_inputs(docs: list[SpecDocument], outputs: list[Path]) -> None:
    """A usage error when an output file is one of the input specs (``-o slos.yaml`` for ``slos.yaml``, or the
    input folder as ``-o``): writing would replace the spec with its rules."""
    inputs = {doc.path.resolve() for doc in docs}
    for path in outputs:
        if path.resolve() in inputs:
            raise typer.BadParameter(
                f"{path} is an input spec; writing the rules there would replace it", param_hint="--out"
            )


@app.command("compile")
def compile_cmd(
    inputs: list[Path] = typer.Argument(..., help="Spec files or folders (every .yaml/.yml inside, recursively)."),
    out: str = typer.Option(
        ..., "--out", "-o", help="Output folder (one rule file per input document), a .yaml file, or - for stdout."
    ),
    period: str | None = typer.Option(None, "--period", "-p", help=_PERIOD_HELP),
    windows: list[Path] = typer.Option([], "--windows", "-w", help=_WINDOWS_HELP),
    fmt: str | None = typer.Option(
        None, "--format", help="prometheus or prometheus-operator (default: PrometheusRule for Kubernetes CRs only)."
    ),
    extra_label: list[str] = typer.Option([], "--extra-label", "-l", help="KEY=VALUE added to every rule."),
    disable_alerts: bool = typer.Option(False, "--disable-alerts", help="Recording rules only."),
    disable_recordings: bool = typer.Option(False, "--disable-recordings", help="Alerting rules only."),
    tests: bool = typer.Option(False, "--tests", help="Also write promtool test files (OUT/tests/<slo>.test.yaml)."),
    strict: bool = typer.Option(False, "--strict", help="Treat warnings (unknown keys, …) as errors."),
    runbook_base_url: str | None = typer.Option(
        None,
        "--runbook-base-url",
        help="runbook_url base: an http(s) URL or a relative path (default for llmpath specs: runbooks/generated).",
    ),
    dashboard_base_url: str | None = typer.Option(
        None,
        "--dashboard-base-url",
        help="Grafana base for dashboard_url, an http(s) URL (default for llmpath specs: http://localhost:3000).",
    ),
    plugins: list[str] = typer.Option([], "--plugins", help=PLUGINS_HELP),
    ignore_duplicates: bool = typer.Option(False, "--ignore-duplicates", help=_DUPLICATES_HELP),
    buckets: list[str] = typer.Option([], "--buckets", help=BUCKETS_HELP),
    catalog: Path | None = typer.Option(None, "--catalog", help=CATALOG_HELP),
) -> None:
    """Compile specs into Prometheus recording and multi-window multi-burn-rate alert rules."""
    from llmpath.slo import CompileOptions

    if fmt not in (None, "prometheus", "prometheus-operator"):
        raise typer.BadParameter("use prometheus or prometheus-operator", param_hint="--format")
    if out == "-" and tests:
        raise typer.BadParameter("--tests needs an output folder", param_hint="--out")
    target = Path(out)
    single_file = out != "-" and target.suffix in (".yaml", ".yml")
    if single_file and tests:
        raise typer.BadParameter("--tests needs an output folder, not a .yaml file", param_hint="--out")
    if single_file and target.is_dir():
        raise typer.BadParameter(f"{out} is a folder", param_hint="--out")
    if out != "-" and not single_file and target.exists() and not target.is_dir():
        raise typer.BadParameter(f"{out} exists and is not a folder", param_hint="--out")
    check_base_url_or_path(runbook_base_url, "--runbook-base-url")
    check_http_url(dashboard_base_url, "--dashboard-base-url")
    sli_plugins, slo_plugins = load_plugins(plugins)
    options = CompileOptions(
        period=period,
        windows_file=list(windows) or None,
        extra_labels=_parse_labels(extra_label),
        runbook_base_url=runbook_base_url,
        dashboard_base_url=dashboard_base_url,
        disable_alerts=disable_alerts,
        disable_recordings=disable_recordings,
        format=fmt,
        tests=tests,
        strict=strict,
        sli_plugins=sli_plugins,
        slo_plugins=slo_plugins,
        ignore_duplicates=ignore_duplicates,
        histogram_buckets=parse_buckets(buckets),
        stages=catalog_or_exit(catalog),
    )
    docs = _load(inputs, options, out)
    result = _compile_docs(docs, options, out)
    if out == "-":
        sys.stdout.write("".join(result.files.values()))
        return
    if single_file:
        if len(result.files) != 1:
            _fail([f"{len(result.files)} output documents need an output folder, not the single file {out}"], out)
        folder, files = target.parent, {target.name: next(iter(result.files.values()))}
    else:
        files = dict(result.files)
        files.update({f"tests/{name}": text for name, text in result.test_files.items()})
        folder = target
    written = [folder / name for name in files]
    _refuse_to_replace_inputs(docs, written)
    _write_or_fail(folder, files, out)
    if single_file:
        _err(f"compiled {len(result.slos)} SLOs into {out}")
    else:
        _err(
            f"compiled {len(result.slos)} SLOs into {len(result.files)} rule file(s)"
            + (f" and {len(result.test_files)} promtool test file(s)" if result.test_files else "")
            + f" under {out}"
        )
    for path in written:
        typer.echo(str(path))


@app.command("validate")
def validate_cmd(
    inputs: list[Path] = typer.Argument(..., help="Spec files or folders."),
    period: str | None = typer.Option(None, "--period", "-p", help=_PERIOD_HELP),
    windows: list[Path] = typer.Option([], "--windows", "-w", help=_WINDOWS_HELP),
    strict: bool = typer.Option(False, "--strict", help="Treat warnings (unknown keys, …) as errors."),
    plugins: list[str] = typer.Option([], "--plugins", help=PLUGINS_HELP),
    ignore_duplicates: bool = typer.Option(False, "--ignore-duplicates", help=_DUPLICATES_HELP),
    buckets: list[str] = typer.Option([], "--buckets", help=BUCKETS_HELP),
    catalog: Path | None = typer.Option(None, "--catalog", help=CATALOG_HELP),
    prometheus: str | None = typer.Option(
        None,
        "--prometheus",
        help="Also check against this Prometheus: latency thresholds against the histograms' real bucket bounds, "
        "and that every SLI selector matches series (a warning names what does not match).",
    ),
    timeout: float = typer.Option(10.0, "--timeout", envvar="LLMPATH_PROMETHEUS_TIMEOUT", min=0.1, help=_TIMEOUT_HELP),
    bearer_token_file: Path | None = typer.Option(None, "--bearer-token-file", help=_TOKEN_HELP),
) -> None:
    """Validate specs without writing anything; duplicate SLO IDs across files are an error."""
    from llmpath.slo import CompileOptions

    sli_plugins, slo_plugins = load_plugins(plugins)
    options = CompileOptions(
        period=period,
        windows_file=list(windows) or None,
        strict=strict,
        sli_plugins=sli_plugins,
        slo_plugins=slo_plugins,
        ignore_duplicates=ignore_duplicates,
        histogram_buckets=parse_buckets(buckets),
        stages=catalog_or_exit(catalog),
    )
    if prometheus is None:
        result, live = _compile(inputs, options, None), ""
    else:
        client_args = {"timeout": timeout, "token": _token(bearer_token_file)}
        result, live = _validate_live(inputs, options, prometheus.rstrip("/"), client_args)
    files = {s.source for s in result.slos}
    typer.echo(f"OK: {len(result.slos)} SLOs in {len(files)} file(s) are valid{live}.")


def _validate_live(
    inputs: list[Path], options: CompileOptions, url: str, client_args: dict
) -> tuple[CompileResult, str]:
    """``validate --prometheus``: compile with the histograms' live bucket bounds, then check the SLIs' data.
    Returns the result and what the check found, for the closing line."""
    import dataclasses

    from llmpath.live.promapi import PrometheusClient, redact
    from llmpath.live.slo_check import data_issues, live_buckets

    docs = _load(inputs, options, None)
    histograms = [slo.sli.histogram for doc in docs for slo in doc.slos if slo.sli.histogram]
    # Connection errors and timeouts, answers that are not Prometheus's, refused or malformed queries:
    unreadable = _UNREADABLE
    try:
        client = PrometheusClient(url, **client_args)
    except unreadable as exc:
        _prometheus_failed(url, exc)
    url = redact(url)
    with client:
        try:
            live = live_buckets(client, histograms)
        except unreadable as exc:
            _prometheus_failed(url, exc)
        options = dataclasses.replace(options, histogram_buckets={**options.histogram_buckets, **live})
        result = _compile_docs(docs, options, None)
        specs = {(doc.file, slo.id): slo for doc in docs for slo in doc.slos}
        try:
            no_data = data_issues(client, result.slos, lambda slo, field: specs[slo.source, slo.id].where(field))
        except unreadable as exc:
            _prometheus_failed(url, exc)
    for warning in client.warnings:
        _err(f"Prometheus {url} warned: {warning}")
    if options.strict and no_data:
        _fail([str(i.as_error()) for i in no_data])
    for issue in no_data:
        _err(str(issue))
    data = f"{len(no_data)} warning(s) about SLI data" if no_data else "every SLI selector matches series"
    return result, f"; Prometheus {url}: {len(live)} histogram(s) with live buckets, {data}"


def _prometheus_failed(url: str, exc: Exception, command: str = "validate") -> NoReturn:
    from llmpath.live.promapi import PrometheusError, redact

    why = str(exc) if isinstance(exc, PrometheusError) else f"{type(exc).__name__}: {exc}"
    what = "SLOs from Prometheus" if command == "status" else "Prometheus"
    _err(f"llmpath slo {command}: cannot read {what} at {redact(url)}: {why}")
    raise typer.Exit(2) from None


def _write_or_fail(out_dir: Path, files: dict[str, str], out: str) -> None:
    """:func:`write_atomically`, or the reason it could not (a file in the way, no permission, a full disk) and the
    spec-error exit; nothing is left half-written."""
    try:
        write_atomically(out_dir, files)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        _fail([f"{out}: cannot write{where}: {exc.strerror or exc}"], out)


@app.command("init")
def init_cmd(
    path: str = typer.Argument("slos.yaml", help="Where to write the spec (- for stdout)."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite an existing file."),
) -> None:
    """Write the default LLM API spec (availability, TTFT, gateway overhead, scheduling, prefill, time per output
    token, cache hit rate)."""
    from llmpath.slo import default_spec_path

    default = default_spec_path()
    text = default.read_text(encoding="utf-8")
    if path == "-":
        sys.stdout.write(text)
        return
    target = Path(path)
    # The header's commands name the file they are in.
    text = text.replace(f"llmpath slo compile {default.name} ", f"llmpath slo compile {target} ")
    text = text.replace(f"llmpath slo validate {default.name} ", f"llmpath slo validate {target} ")
    if target.is_dir():
        _err(f"{target} is a folder; give a file name.")
        raise typer.Exit(1)
    if target.exists() and not force:
        _err(f"{target} already exists; pass --force to overwrite it.")
        raise typer.Exit(1)
    _write_or_fail(target.parent, {target.name: text}, str(target))
    _err(f"wrote the default LLM API SLO spec to {target}; next: llmpath slo compile {target} -o rules/ --tests")


@app.command()
def status(
    prometheus: str = typer.Option(
        "http://127.0.0.1:9090", "--prometheus", envvar="LLMPATH_PROMETHEUS_URL", help="Prometheus base URL."
    ),
    service: str | None = typer.Option(None, "--service", help="Only the SLOs of this service."),
    owner: str | None = typer.Option(None, "--owner", help="Only the SLOs this team owns (e.g. serving)."),
    firing: bool = typer.Option(False, "--firing", help="Only the SLOs (and groups) with a firing alert."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable JSON instead of a table."),
    timeout: float = typer.Option(10.0, "--timeout", envvar="LLMPATH_PROMETHEUS_TIMEOUT", min=0.1, help=_TIMEOUT_HELP),
    bearer_token_file: Path | None = typer.Option(None, "--bearer-token-file", help=_TOKEN_HELP),
) -> None:
    """Every SLO Prometheus evaluates: SLI, burn rate and error budget left per group (route), firing alerts with
    their owners and runbooks. Reads the compiled rules' series, not spec files. Exits 2 when the answer is unknown
    (Prometheus unreadable, no SLO rules, none of ``--service``, SLI recording rules not loaded, alerts of an SLO it
    does not describe)."""
    import dataclasses
    import json

    from llmpath.live.promapi import PrometheusClient, redact
    from llmpath.live.slo_status import FiringAlert, slo_services, slo_status

    services: list[str] = []
    unknown: list[tuple[str, FiringAlert]] = []
    url = redact(prometheus)
    try:
        with PrometheusClient(prometheus.rstrip("/"), timeout=timeout, token=_token(bearer_token_file)) as client:
            rows = slo_status(client, service=service, unknown=unknown)
            if not rows and service is not None:
                services = slo_services(client)
    except _UNREADABLE as exc:
        _prometheus_failed(prometheus, exc, "status")
    for warning in client.warnings:
        _err(f"llmpath slo status: Prometheus {url} warned: {warning} (the numbers may be partial)")
    for slo_id, alert in unknown:
        _err(f"llmpath slo status: {alert.name} ({alert.severity}) fires for SLO {slo_id!r}, which no sloth_slo_info "
             f"series in {url} describes (its recording rules are not loaded)")  # fmt: skip
    if not rows and not services:
        _err(f"llmpath slo status: no SLO rules evaluated by {url} (sloth_slo_info has no series)")
        raise typer.Exit(2)
    if not rows:  # a service Prometheus has no SLO of (a typo, or rules not loaded): its state is unknown
        _err(f"llmpath slo status: no SLO has service {service!r}; services with SLOs in {url}: {', '.join(services)}")
        raise typer.Exit(2)
    rows = [r for r in rows if owner is None or r.owner == owner]
    blind = sorted({r.slo_id for r in rows if not r.rules_loaded})  # unknown state: named even with --firing
    idle = sorted({r.slo_id for r in rows if r.rules_loaded and not r.recorded})
    rows = [r for r in rows if not firing or r.alerts]
    if as_json:
        typer.echo(json.dumps([dataclasses.asdict(r) for r in rows], indent=2, allow_nan=False))
    else:
        _print_status(rows, owner, firing)
    for slo_id in idle:
        _err(f"llmpath slo status: SLO {slo_id!r} has no data in {url}: its recording rules are loaded but record "
             "no series (no traffic yet, or its SLI metrics are not scraped)")  # fmt: skip
    for slo_id in blind:
        _err(f"llmpath slo status: SLO {slo_id!r} has no recorded series in {url} (slo:sli_error:ratio_rate*, "
             "slo:current_burn_rate:ratio, slo:period_error_budget_remaining:ratio) and no such recording rules "
             "loaded: its recording rules are not loaded; its state is unknown")  # fmt: skip
    if blind or unknown:
        raise typer.Exit(2)


def _print_status(rows: list[SloRow], owner: str | None, firing: bool) -> None:
    """The status table and firing lines, or why no row is shown."""
    from rich.console import Console
    from rich.markup import escape

    from llmpath.cli.tables import print_table
    from llmpath.live.slo_status import firing_lines, status_table

    console = Console()
    if not rows:
        wanted = [f"owned by {owner!r}"] if owner else []
        wanted += ["with a firing alert"] if firing else []
        console.print(escape(f"no SLO {' and '.join(wanted)}"))
        return
    print_table(console, status_table(rows))
    for line in firing_lines(rows):
        console.print(f"[red]firing[/] {line}", soft_wrap=True)
