"""Rich tables for ledger figures (used by ``llmpath usage`` and the demo's report).

Ledger values (tenants, routes, models, ids, stage names) go into tables as :class:`~rich.text.Text`, never through
rich markup or emoji codes, so ``team[eu]`` or ``[red]ops`` print as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from rich import box
from rich.table import Table
from rich.text import Text

from llmpath.instrumentation import STAGES, UNATTRIBUTED
from llmpath.instrumentation.catalog import TOKEN_TYPES
from llmpath.instrumentation.usage import UsageRecord
from llmpath.ledger.summary import LedgerSummary, stage_totals, untracked_s

#: The ``usage slowest --by duration`` column for time in no stage (see :func:`untracked_s`).
UNTRACKED = "untracked"


def plain(value: str) -> Text:
    """A ledger value as literal text (no markup, no emoji codes)."""
    return Text(value)


def ms(seconds: float | None) -> str:
    """Milliseconds, or a dash for no value."""
    return "–" if seconds is None else f"{seconds * 1000:,.1f} ms"


def pct(ratio: float | None) -> str:
    """A percentage, or a dash for no value."""
    return "–" if ratio is None else f"{ratio * 100:.1f}%"


def when(epoch: float) -> str:
    """An epoch time as UTC ISO 8601 (milliseconds)."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def table(title: str | Text, columns: dict[str, str] | Sequence[tuple[str, str]]) -> Table:
    """A compact table; ``columns``: header → justification (pairs when headers repeat; headers are literal)."""
    out = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for header, justify in columns.items() if isinstance(columns, dict) else columns:
        out.add_column(plain(header), justify=justify, no_wrap=justify == "left")  # type: ignore[arg-type]
    return out


def headline(summary: LedgerSummary) -> str:
    """Requests, server errors and TTFT percentiles in one line."""
    return (
        f"{summary.requests} requests, {summary.errors} server errors — TTFT p50 [bold]{ms(summary.ttft_p50_s)}[/], "
        f"p95 [bold]{ms(summary.ttft_p95_s)}[/], p99 {ms(summary.ttft_p99_s)}"
    )


def stage_table(summary: LedgerSummary) -> Table:
    """Where the time goes, stage by stage, with each stage's owner and share of TTFT."""
    out = table(
        "Where the time goes (per request)",
        {"stage": "left", "owner": "left", "p50": "right", "p95": "right", "mean": "right", "of TTFT": "right"},
    )
    for row in summary.stages:
        out.add_row(
            plain(row.stage), plain(row.owner), ms(row.p50_s), ms(row.p95_s), ms(row.mean_s), pct(row.ttft_share)
        )
    return out


def route_table(summary: LedgerSummary) -> Table:
    """Requests, errors and latency per route."""
    out = table(
        "By route",
        {"route": "left", "requests": "right", "5xx": "right", "4xx": "right", "TTFT p50": "right",
         "TTFT p95": "right", "duration p50": "right"},
    )  # fmt: skip
    for r in summary.routes:
        out.add_row(plain(r.route), str(r.requests), str(r.server_errors), str(r.client_errors), ms(r.ttft_p50_s),
                    ms(r.ttft_p95_s), ms(r.duration_p50_s))  # fmt: skip
    return out


def cache_table(summary: LedgerSummary) -> Table:
    """Prompt-cache hit rate per route: the gateway's prediction next to the backends' figure."""
    out = table(
        "Prompt cache by route (share of prompt tokens from cache)",
        {"route": "left", "requests": "right", "predicted": "right", "actual": "right", "cached / prompt": "right"},
    )
    for c in summary.cache:
        out.add_row(
            plain(c.route),
            str(c.requests),
            pct(c.predicted_hit_rate),
            pct(c.actual_hit_rate),
            f"{c.cached_tokens:,} / {c.input_tokens:,}",
        )
    return out


def cost_tables(summary: LedgerSummary) -> list[Table]:
    """Cost and what the prompt cache saved, by tenant and by route (none without a price file)."""
    cost = summary.cost
    if cost is None:
        return []
    unit = f" ({cost.currency})" if cost.currency else ""
    tables = []
    for title, rows in (("tenant", cost.by_tenant), ("route", cost.by_route)):
        out = table(
            f"Cost by {title}{unit}", {title: "left", "requests": "right", "cost": "right", "cache saved": "right"}
        )
        for row in rows:
            out.add_row(plain(row.name), f"{row.requests:,}", money(row.cost), money(row.cache_saving))
        out.add_row("[bold]total", f"[bold]{sum(r.requests for r in rows):,}", f"[bold]{money(cost.total)}",
                    f"[bold]{money(cost.cache_saving)}")  # fmt: skip
        tables.append(out)
    return tables


def unpriced_line(summary: LedgerSummary) -> str | None:
    """Which models had no price (their requests are not in the cost tables), or ``None``; plain text (print it
    as :class:`~rich.text.Text`, not markup)."""
    if summary.cost is None or not summary.cost.unpriced:
        return None
    listed = ", ".join(f"{model} ({n:,} requests)" for model, n in summary.cost.unpriced.items())
    return f'no price for {listed}: left out of the cost (add them, or a [models."*"] entry, to the price file)'


def money(amount: float) -> str:
    """An amount with 4 decimals under 1 (token costs are small), 2 above."""
    return f"{amount:,.4f}" if abs(amount) < 1 else f"{amount:,.2f}"


def tenant_table(summary: LedgerSummary) -> Table:
    """Per tenant: requests, throttled (429) and failed (5xx) ones, tokens by type (and, when a reasoning model
    answered, how many output tokens were its thinking); with the totals."""
    columns = {"tenant": "left", "requests": "right", "429": "right", "5xx": "right"}
    thinking = summary.reasoning_tokens > 0
    extra = {"of which reasoning": "right"} if thinking else {}
    out = table("By tenant", {**columns, **dict.fromkeys(TOKEN_TYPES, "right"), **extra})
    for t in summary.tenants:
        out.add_row(
            plain(t.tenant), f"{t.requests:,}", f"{t.throttled:,}", f"{t.server_errors:,}",
            *(f"{t.tokens[k]:,}" for k in TOKEN_TYPES), *([f"{t.reasoning_tokens:,}"] if thinking else []),
        )  # fmt: skip
    totals = [summary.requests, sum(t.throttled for t in summary.tenants), summary.errors]
    totals += [summary.tokens[k] for k in TOKEN_TYPES]
    totals += [summary.reasoning_tokens] if thinking else []
    out.add_row("[bold]total", *(f"[bold]{n:,}" for n in totals))
    return out


def slowest_table(records: list[UsageRecord], by: str) -> Table:
    """The given requests, one row each, with ms per stage. By ``ttft``: the stages before the first token and
    ``unattributed``, which add up to TTFT; by ``duration``: every stage (decode too), ``unattributed`` and
    ``untracked`` (see :func:`untracked_s`), which add up to the duration. Stages that overlap add up to more."""
    seen = dict.fromkeys(s.name for r in records for s in r.stages)
    before = [name for name in seen if _before_first_token(name, records)]
    names = [*before, UNATTRIBUTED]
    if by == "duration":
        names += [name for name in seen if name not in before] + [UNTRACKED]
    columns = [("request", "left"), ("trace", "left"), ("route", "left"), ("status", "right"), (by, "right")]
    out = table(f"Slowest requests by {by} (ms per stage)", columns + [(name, "right") for name in names])
    for r in records:
        spent = stage_totals(r)
        if by == "duration":
            spent[UNTRACKED] = untracked_s(r)
        value = r.ttft_s if by == "ttft" else r.duration_s
        cells = [f"{spent[n] * 1000:,.1f}" if n in spent else "–" for n in names]
        out.add_row(plain(r.request_id), plain(r.trace_id or "–"), plain(r.route), str(r.status_code), ms(value),
                    *cells)  # fmt: skip
    return out


def _before_first_token(name: str, records: list[UsageRecord]) -> bool:
    """Whether stage ``name`` runs before the first token: the catalog says so for built-in stages; a custom
    stage does if it starts before the first token in some request."""
    if name in STAGES:
        return STAGES[name].before_first_token
    return any(s.name == name and s.start_s < r.ttft_s for r in records if r.ttft_s is not None for s in r.stages)


def record_header(record: UsageRecord) -> list[Text]:
    """One request's labels, timings and tokens (and its annotations) as lines of literal text."""
    error = f"  error {record.error}" if record.error else ""
    lines = [
        Text.assemble(
            (record.request_id, "bold"),
            f"  trace {record.trace_id or '–'}  tenant {record.tenant or '–'}  route {record.route}  "
            f"model {record.model}  status {record.status_code}{error}",
        ),
        Text(
            f"TTFT {ms(record.ttft_s)}, duration {ms(record.duration_s)}, per output token {ms(record.tpot_s)}; "
            f"tokens {record.input_tokens:,} input ({record.cached_tokens:,} cached), {record.output_tokens:,} output"
        ),
    ]
    if record.extra:
        lines.append(Text("annotations: " + ", ".join(f"{k}={v}" for k, v in sorted(record.extra.items()))))
    return lines


def record_table(record: UsageRecord) -> Table:
    """One request's timeline: each stage's start offset, duration and timing source."""
    out = table(
        Text(f"request {record.request_id} — {when(record.time)}"),
        {"stage": "left", "starts at": "right", "takes": "right", "source": "left"},
    )
    for s in sorted(record.stages, key=lambda s: s.start_s):
        out.add_row(plain(s.name), ms(s.start_s), ms(s.duration_s), plain(s.source))
    if record.unattributed_s is not None:
        out.add_row(UNATTRIBUTED, "", ms(record.unattributed_s), "")
    return out
