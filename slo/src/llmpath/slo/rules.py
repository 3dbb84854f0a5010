"""Rule generation: Sloth's SLI, metadata and multi-window multi-burn-rate alert rules (identical expressions),
plus the llmpath extensions (latency and ratio SLIs, zero-traffic guard, count-based period SLI, ``for:``,
absent and threshold alerts, stage/owner labels)."""

from __future__ import annotations

from llmpath.slo.gofmt import (
    duration_hours,
    format_duration,
    go_float,
    go_float_fixed,
    go_quote,
    parse_duration,
    prom_filter,
)
from llmpath.slo.gotemplate import render_window
from llmpath.slo.model import LLMPATH_V1, PERIOD_RULE_COUNT, BurnWindow, ExtraAlert, PluginRequest, Rule, SLOSpec
from llmpath.slo.windows import AlertWindows

SLI_ERROR = "slo:sli_error:ratio_rate"
ERROR_EVENTS = "slo:sli_error_events:rate"
TOTAL_EVENTS = "slo:sli_total_events:rate"
OBJECTIVE = "slo:objective:ratio"
ERROR_BUDGET = "slo:error_budget:ratio"
TIME_PERIOD_DAYS = "slo:time_period:days"
CURRENT_BURN_RATE = "slo:current_burn_rate:ratio"
PERIOD_BURN_RATE = "slo:period_burn_rate:ratio"
BUDGET_REMAINING = "slo:period_error_budget_remaining:ratio"
SLO_INFO = "sloth_slo_info"
WINDOW_LABEL = "sloth_window"
SEVERITY_LABEL = "sloth_severity"
WINDOW_VAR = "{{.window}}"
SERVICE_SLO = "{{$labels.sloth_service}} {{$labels.sloth_slo}}"


def id_labels(slo: SLOSpec) -> dict[str, str]:
    """``sloth_id``, ``sloth_service``, ``sloth_slo``."""
    return {"sloth_id": slo.id, "sloth_service": slo.service, "sloth_slo": slo.name}


def sli_metric(window_ms: int) -> str:
    return SLI_ERROR + format_duration(window_ms)


def _merge(*maps: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for m in maps:
        out.update(m)
    return out


# --------------------------------------------------------------------------------------------
# SLI queries: llmpath latency and ratio SLIs become events queries.
# --------------------------------------------------------------------------------------------


def le_regex(threshold: float) -> str:
    """A regex for every common spelling of a bucket bound: ``1`` and ``1.0`` (Go vs Python/Prometheus 3), ``0.5``,
    and the exponent form every client writes for bounds below 1e-4 or from 1e6 up (``5e-05``, ``1e+06``)."""
    fixed = go_float_fixed(threshold)
    text = fixed.replace(".", "\\.")
    pattern = f"{text}0*" if "." in fixed else f"{text}(\\.0*)?"
    short = go_float(threshold)
    if "e" in short:
        pattern += "|" + short.replace(".", "\\.").replace("+", "\\+")
    return pattern


def le_matcher(threshold: float) -> str:
    """The ``le`` matcher of a latency SLI's good-bucket selector (regex escaped for a PromQL string)."""
    return f'le=~"{le_regex(threshold).replace(chr(92), chr(92) * 2)}"'


def _selector(metric: str, matchers: list[str]) -> str:
    return f"{metric}{{{','.join(matchers)}}}" if matchers else metric


def _sum_rate(selector: str, group_by: tuple[str, ...]) -> str:
    by = f" by ({', '.join(group_by)})" if group_by else ""
    return f"sum{by}(rate({selector}[{WINDOW_VAR}]))"


def event_queries(slo: SLOSpec) -> tuple[str, str] | None:
    """(error, total) query templates of an events-like SLI (events, latency, ratio), else ``None``."""
    sli = slo.sli
    if sli.kind == "events":
        return sli.error_query or "", sli.total_query or ""
    if sli.kind == "latency":
        base = [f"{k}={go_quote(v)}" for k, v in sli.selector.items()]
        if sli.filter:
            base.append(sli.filter.strip().strip("{}").strip())
        count = _sum_rate(_selector(f"{sli.histogram}_count", base), slo.group_by)
        good = _sum_rate(_selector(f"{sli.histogram}_bucket", [*base, le_matcher(sli.threshold or 0.0)]), slo.group_by)
        return f"{count}\n-\n{good}", count
    if sli.kind == "ratio":
        total = _sum_rate(sli.total or "", slo.group_by)
        zero = f"0 * {total}"
        if sli.bad is not None:
            return f"{_sum_rate(sli.bad, slo.group_by)} or {zero}", total
        return f"{total}\n-\n({_sum_rate(sli.good or '', slo.group_by)} or {zero})", total
    return None


def _events_expr(error: str, total: str, guard: bool) -> str:
    if guard:
        return f"({error})\n/\n(({total}) > 0)\n"
    return f"({error})\n/\n({total})\n"


def threshold_windows(extra: ExtraAlert, windows: AlertWindows) -> tuple[int, int]:
    """(short, long) of a threshold alert in ms; the catalog's ticket-slow pair when not given."""
    short = parse_duration(extra.short_window) if extra.short_window else windows.ticket_slow.short_ms
    long = parse_duration(extra.long_window) if extra.long_window else windows.ticket_slow.long_ms
    return short, long


def threshold_pair(extra: ExtraAlert, windows: AlertWindows) -> BurnWindow:
    """A threshold alert's one window pair."""
    short_ms, long_ms = threshold_windows(extra, windows)
    factor = float(extra.factor or 1.0)
    return BurnWindow(
        format_duration(short_ms), format_duration(long_ms), factor, factor * long_ms / windows.period_ms * 100
    )


def sli_windows(slo: SLOSpec, windows: AlertWindows) -> list[int]:
    """The SLI recording windows: the catalog's alert windows plus threshold-alert windows, ascending."""
    out = set(windows.alert_windows_ms())
    for extra in slo.extra_alerts:
        if extra.kind == "threshold":
            out.update(threshold_windows(extra, windows))
    return sorted(out)


def alert_pairs(slo: SLOSpec, windows: AlertWindows, severity: str | None = None) -> list[BurnWindow]:
    """Every window pair of the SLO's enabled burn-rate and threshold alerts (of one ``severity`` if given)."""
    pairs = [p for sev, meta in (("page", slo.page), ("ticket", slo.ticket))
             if not meta.disable and severity in (None, sev) for p in windows.burn_windows(sev)]  # fmt: skip
    pairs += [threshold_pair(extra, windows) for extra in slo.extra_alerts
              if extra.kind == "threshold" and severity in (None, extra.severity)]  # fmt: skip
    return pairs


def guarded_windows(slo: SLOSpec, windows: AlertWindows) -> list[int]:
    """The long windows whose event count ``min_events`` checks (ms, ascending)."""
    return sorted({parse_duration(p.long) for p in alert_pairs(slo, windows)})


def base_window(windows: AlertWindows) -> int:
    """The shortest page window (Sloth averages it over the period)."""
    return windows.page_quick.short_ms


def sli_rules(req: PluginRequest, optimized: bool = True) -> list[Rule]:
    """Sloth's ``sli_rules/v1`` (plus the llmpath count-based period rule when asked for)."""
    slo, windows = req.slo, req.windows
    ids = id_labels(slo)
    period_ms = windows.period_ms
    events = event_queries(slo)
    guard = slo.guard_zero_traffic

    def expr_for(window: str) -> str:
        if events is not None:
            return render_window(_events_expr(events[0], events[1], guard), window)
        return render_window(f"({slo.sli.error_ratio_query})", window)

    rules = []
    for w in sli_windows(slo, windows):
        win = format_duration(w)
        rules.append(
            Rule(expr=expr_for(win), record=sli_metric(w), labels=_merge(ids, {WINDOW_LABEL: win}, slo.labels))
        )
    period = format_duration(period_ms)
    base = format_duration(base_window(windows))
    flt = prom_filter(ids)
    counted_events = events if slo.period_rule == PERIOD_RULE_COUNT else None
    counted = counted_events is not None
    if counted_events is not None:
        for name, query in ((ERROR_EVENTS, counted_events[0]), (TOTAL_EVENTS, counted_events[1])):
            rules.append(
                Rule(
                    expr=render_window(query, base),
                    record=name + base,
                    labels=_merge(ids, {WINDOW_LABEL: base}, slo.labels),
                )
            )
    if slo.min_events is not None and events is not None:
        for w in guarded_windows(slo, windows):
            win = format_duration(w)
            if not (counted and win == base):  # recorded above
                rules.append(
                    Rule(
                        expr=render_window(events[1], win),
                        record=TOTAL_EVENTS + win,
                        labels=_merge(ids, {WINDOW_LABEL: win}, slo.labels),
                    )
                )
    if counted:
        expr = (
            f"sum_over_time({ERROR_EVENTS}{base}{flt}[{period}])\n/ ignoring ({WINDOW_LABEL})\n"
            f"(sum_over_time({TOTAL_EVENTS}{base}{flt}[{period}]) > 0)\n"
        )
    elif optimized:
        metric = sli_metric(base_window(windows))
        expr = (
            f"sum_over_time({metric}{flt}[{period}])\n/ ignoring ({WINDOW_LABEL})\n"
            f"count_over_time({metric}{flt}[{period}])\n"
        )
    else:
        expr = expr_for(period)
    rules.append(Rule(expr=expr, record=sli_metric(period_ms), labels=_merge(ids, {WINDOW_LABEL: period}, slo.labels)))
    return rules


def _burn_rate_expr(sli: str, flt: str) -> str:
    return f"{sli}{flt}\n/ on(sloth_id, sloth_slo, sloth_service) group_left\n{ERROR_BUDGET}{flt}\n"


def metadata_rules(req: PluginRequest) -> list[Rule]:
    """Sloth's ``metadata_rules/v1``."""
    slo, windows = req.slo, req.windows
    ids = id_labels(slo)
    labels = _merge(ids, slo.labels)
    ratio = slo.objective / 100
    flt = prom_filter(ids)
    info = _merge(
        labels,
        {k: v for k, v in (("stage", slo.stage), ("owner", slo.owner)) if v and req.spec == LLMPATH_V1},
        {
            "sloth_version": req.version,
            "sloth_mode": req.mode,
            "sloth_spec": req.spec,
            "sloth_objective": go_float_fixed(slo.objective),
        },
    )
    period_days = go_float(duration_hours(windows.period_ms) / 24)
    return [
        Rule(expr=f"vector({go_float(ratio)})", record=OBJECTIVE, labels=dict(labels)),
        Rule(expr=f"vector(1-{go_float(ratio)})", record=ERROR_BUDGET, labels=dict(labels)),
        Rule(expr=f"vector({period_days})", record=TIME_PERIOD_DAYS, labels=dict(labels)),
        Rule(
            expr=_burn_rate_expr(sli_metric(base_window(windows)), flt), record=CURRENT_BURN_RATE, labels=dict(labels)
        ),
        Rule(expr=_burn_rate_expr(sli_metric(windows.period_ms), flt), record=PERIOD_BURN_RATE, labels=dict(labels)),
        Rule(expr=f"1 - {PERIOD_BURN_RATE}{flt}", record=BUDGET_REMAINING, labels=dict(labels)),
        Rule(expr="vector(1)", record=SLO_INFO, labels=info),
    ]


# --------------------------------------------------------------------------------------------
# Alerts.
# --------------------------------------------------------------------------------------------


def _pair(pair: BurnWindow, flt: str, budget: float, min_events: int | None) -> str:
    threshold = f"({go_float(pair.factor)} * {go_float(budget)})"
    expr = (
        f"    max({SLI_ERROR}{pair.short}{flt} > {threshold}) without ({WINDOW_LABEL})\n"
        "    and\n"
        f"    max({SLI_ERROR}{pair.long}{flt} > {threshold}) without ({WINDOW_LABEL})\n"
    )
    if min_events is not None:  # llmpath: too few events in the long window to judge the ratio
        seconds = go_float(parse_duration(pair.long) / 1000)
        expr += (
            f"    and\n    max({TOTAL_EVENTS}{pair.long}{flt} * {seconds} >= {min_events}) without ({WINDOW_LABEL})\n"
        )
    return expr


def mwmb_expr(slo: SLOSpec, pairs: tuple[BurnWindow, ...]) -> str:
    """Sloth's multi-window multi-burn-rate expression (one ``( … )`` block per window pair, joined by ``or``), with
    llmpath's minimum event count when the SLO sets ``min_events``."""
    flt = prom_filter(id_labels(slo))
    budget = (100 - slo.objective) / 100
    blocks = ["(\n" + _pair(p, flt, budget, slo.min_events) + ")\n" for p in pairs]
    return "or\n".join(blocks)


def _time_text(hours: float) -> str:
    if hours < 2:
        return f"{hours * 60:.0f} minutes"
    if hours < 48:
        return f"{hours:.0f} hours"
    return f"{hours / 24:.1f} days"


def _description(slo: SLOSpec, pairs: tuple[BurnWindow, ...], period_ms: int) -> str:
    first, rest = pairs[0], pairs[1:]
    conds = f"{go_float(round(first.factor, 2))}x the sustainable rate over both {first.long} and {first.short}"
    conds += "".join(f", or {go_float(round(p.factor, 2))}x over both {p.long} and {p.short}" for p in rest)
    fastest = max(p.factor for p in pairs)
    where = f" (stage {slo.stage}, owner {slo.owner})" if slo.stage else ""
    return (
        f"{SERVICE_SLO}{where} is burning its {go_float(slo.objective)}% / {format_duration(period_ms)} error "
        f"budget at more than {conds}{_min_events_text(slo)}. At {go_float(round(fastest, 2))}x the whole budget "
        f"lasts about {_time_text(period_ms / 3_600_000 / fastest)}."
    )


def _min_events_text(slo: SLOSpec) -> str:
    return "" if slo.min_events is None else f" (with at least {slo.min_events} events in the long window)"


def _llmpath_labels(slo: SLOSpec) -> dict[str, str]:
    return {k: v for k, v in (("stage", slo.stage), ("owner", slo.owner)) if v}


def alert_rules(req: PluginRequest) -> list[Rule]:
    """Sloth's ``alert_rules/v1`` page and ticket alerts, plus llmpath's threshold and absent alerts."""
    slo, windows = req.slo, req.windows
    llm = req.spec == LLMPATH_V1
    rules: list[Rule] = []
    for severity, meta in (("page", slo.page), ("ticket", slo.ticket)):
        if meta.disable:
            continue
        pairs = windows.burn_windows(severity)
        annotations = {
            "title": f"({severity}) {SERVICE_SLO} SLO error budget burn rate is too fast.",
            "summary": f"{SERVICE_SLO} SLO error budget burn rate is over expected.",
        }
        if llm:
            annotations["description"] = _description(slo, pairs, windows.period_ms)
        labels = {SEVERITY_LABEL: severity, **(_llmpath_labels(slo) if llm else {})}
        rules.append(
            Rule(
                expr=mwmb_expr(slo, pairs),
                alert=meta.name,
                for_=meta.for_,
                labels=_merge(labels, meta.labels),
                annotations=_merge(annotations, meta.annotations),
                info={"kind": "burn_rate", "severity": severity, "windows": pairs},
            )
        )
    for extra in slo.extra_alerts:
        rules.append(_extra_alert(req, extra))
    return rules


def _extra_alert(req: PluginRequest, extra: ExtraAlert) -> Rule:
    slo, windows = req.slo, req.windows
    labels = {SEVERITY_LABEL: extra.severity, **_llmpath_labels(slo)}
    if extra.kind == "absent":
        # absent() keeps only the selector's id labels: the SLO's static labels (its `labels:`, --extra-label),
        # which the other alerts get from their series, are rule labels here so that it routes like them.
        labels = {**slo.labels, **labels}
        metric = sli_metric(base_window(windows))
        for_ = extra.for_ or format_duration(2 * base_window(windows))
        annotations = {
            "title": f"({extra.severity}) {SERVICE_SLO} SLO has no SLI data.",
            "summary": f"{SERVICE_SLO} SLO has no SLI data: no traffic, or its metrics are not being scraped.",
            "description": (
                f"{metric} has been absent for {for_}: the SLO cannot be evaluated and its burn-rate alerts cannot "
                "fire. Check that the service receives traffic and that Prometheus scrapes its metrics."
            ),
        }
        return Rule(
            expr=f"absent({metric}{prom_filter(id_labels(slo))})",
            alert=extra.name,
            for_=for_,
            labels=_merge(labels, extra.labels),
            annotations=_merge(annotations, extra.annotations),
            info={"kind": "absent", "severity": extra.severity, "windows": ()},
        )
    pair = threshold_pair(extra, windows)
    factor = pair.factor
    annotations = {
        "title": f"({extra.severity}) {SERVICE_SLO} SLO error ratio is above its threshold.",
        "summary": f"{SERVICE_SLO} SLO error ratio is over {go_float(factor)}x its error budget.",
        "description": (
            f"{SERVICE_SLO} has had an error ratio above {go_float(factor)}x its "
            f"{go_float(round(100 - slo.objective, 6))}% budget over both the last {pair.long} and {pair.short}"
            f"{_min_events_text(slo)}."
        ),
    }
    return Rule(
        expr=mwmb_expr(slo, (pair,)),
        alert=extra.name,
        for_=extra.for_,
        labels=_merge(labels, extra.labels),
        annotations=_merge(annotations, extra.annotations),
        info={"kind": "threshold", "severity": extra.severity, "windows": (pair,)},
    )
