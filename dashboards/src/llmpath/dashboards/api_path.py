"""The "LLM API path" dashboard: the request's stages in order, from traffic to tokens."""

from __future__ import annotations

from collections.abc import Sequence

from grafanalib.core import Dashboard

from llmpath.dashboards import common
from llmpath.dashboards.panels import Board, Query, Steps, steps
from llmpath.dashboards.promql import mean, quantile, ratio, sel, sum_increase, sum_rate, zero_if_absent
from llmpath.dashboards.slos import SloView
from llmpath.instrumentation import catalog
from llmpath.instrumentation.catalog import STAGES, UNATTRIBUTED, StageCatalog

#: Error-ratio colours without an availability SLO in the specs.
ERROR_STEPS = steps(("green", None), ("yellow", 0.01), ("red", 0.05))
PERCENTILES = (0.5, 0.95, 0.99)


class SloMarks:
    """What the compiled SLOs put on the API-path panels: the error-ratio colours of an availability SLO (yellow
    from its error budget, red from its fastest page burn) and a dashed line at each latency SLO's threshold on
    the panel of its histogram."""

    def __init__(self, views: Sequence[SloView]) -> None:
        self.availability = next((v for v in views if v.counts_server_errors and v.error_budget > 0), None)
        self._latency = [v for v in views if v.latency is not None]

    def error_steps(self) -> Steps:
        view = self.availability
        if view is None:
            return ERROR_STEPS
        budget = view.error_budget
        page = view.fastest_page_factor
        red = round(budget * page, 10) if page is not None and budget * page < 1 else None
        return steps(("green", None), ("yellow", budget), *((("red", red),) if red is not None else ()))

    def error_note(self) -> str:
        view = self.availability
        if view is None:
            return ""
        page = view.fastest_page_factor
        red = f", red where it pages (×{page:g} the budget)" if page is not None else ""
        return f" Yellow from SLO {view.service}/{view.name}'s error budget ({view.error_budget:.3%}){red}."

    def latency(self, histogram: str, how: str, **matchers: str) -> tuple[Steps | None, str]:
        """Threshold steps for a panel of ``histogram`` with ``matchers``, and a description note saying ``how``
        the thresholds show (``"Dashed line"``, ``"Red"``); ``(None, "")`` without a latency SLO on it."""
        wanted = tuple(sorted(matchers.items()))
        bounds = sorted(
            {(v.latency.threshold, f"{v.service}/{v.name}") for v in self._latency
             if v.latency is not None and v.latency.histogram == histogram and v.latency.matchers == wanted}
        )  # fmt: skip
        if not bounds:
            return None, ""
        marks = steps(("green", None), *(("red", threshold) for threshold, _ in bounds))
        note = "; ".join(f"SLO {name}: {threshold:g} s" for threshold, name in bounds)
        return marks, f" {how}: the latency SLO threshold ({note})."


def stage_latency_key(stage: str) -> str:
    """Panel key of a stage's p50/p95/p99 panel (``unattributed`` and stage groups included)."""
    return f"stage:{stage}:latency"


def _requests(*matchers: str) -> str:
    return sel(catalog.REQUESTS_TOTAL, *matchers)


def _error_ratio(group: tuple[str, ...] = ()) -> str:
    total = sum_rate(_requests(), group)
    errors = sum_rate(_requests('code=~"5.."'), group)
    return ratio(zero_if_absent(errors, total), total)


def _tokens(token_type: str) -> str:
    return sel(catalog.TOKENS_TOTAL, f'type="{token_type}"')


def _cache_hit_rate(group: tuple[str, ...] = ()) -> str:
    prompt = sum_rate(_tokens("input"), group)
    return ratio(zero_if_absent(sum_rate(_tokens("cached"), group), prompt), prompt)


def _percentiles(histogram: str, *matchers: str) -> list[Query]:
    return [Query(quantile(q, histogram, *matchers), f"p{round(q * 100)}") for q in PERCENTILES]


def _stage_description(stage: str, stages: StageCatalog) -> tuple[str, str]:
    if stage == UNATTRIBUTED:
        meaning = "Pre-first-token time no stage covers (gaps between stages, event-loop delays)."
    else:
        meaning = common.literal(stages[stage].meaning)
    return meaning, common.literal(stages.owner(stage))


def build(stages: StageCatalog = STAGES, views: Sequence[SloView] = ()) -> Dashboard:
    """Build the LLM API path dashboard (grafanalib object; see :func:`llmpath.dashboards.grafana.finalize`), with
    one latency panel per stage of ``stages`` (titles name their owners) and the SLOs of ``views`` marked on the
    panels they measure (:class:`SloMarks`)."""
    b = Board(common.SAMPLE_VARIABLES, no_model_note="All models: these metrics have no model label.")
    marks = SloMarks(views)
    _overview(b, marks)
    _traffic(b, marks)
    _where_time_goes(b, stages)
    _stage_percentiles(b, stages, marks)
    _ttft_tpot(b, marks)
    _routing_admission(b)
    _prompt_cache(b)
    _tokens_row(b)
    return common.dashboard(
        "api_path",
        "llmpath / LLM API path",
        "Every stage of an LLM API request, in request order: traffic and errors, where the time before the first "
        "token goes, per-stage latency, TTFT and time per output token, routing and admission, prompt cache, tokens.",
        b,
        common.llmpath_variables(),
        tags=["api-path"],
    )


def _overview(b: Board, marks: SloMarks) -> None:
    b.row("row:overview", "Overview")
    b.stat(
        "overview:requests", "Requests/s", "Finished requests per second (all status codes).", "reqps",
        [Query(sum_rate(_requests()))],
    )  # fmt: skip
    b.stat(
        "overview:errors", "Error ratio (5xx)",
        "Share of requests answered with a 5xx status." + marks.error_note(), "percentunit",
        [Query(_error_ratio())], thresholds=marks.error_steps(), decimals=2,
    )  # fmt: skip
    ttft_steps, ttft_note = marks.latency(catalog.TIME_TO_FIRST_TOKEN, "Red")
    b.stat(
        "overview:ttft_p95", "TTFT p95",
        "95th percentile of time to first token measured by the gateway." + ttft_note,
        "s", [Query(quantile(0.95, catalog.TIME_TO_FIRST_TOKEN))], thresholds=ttft_steps,
    )  # fmt: skip
    overhead_steps, overhead_note = marks.latency(catalog.STAGE_GROUP_DURATION, "Red", group="gateway_overhead")
    b.stat(
        "overview:overhead_p95",
        "Gateway overhead p95",
        "95th percentile of the time the gateway adds before calling the backend (auth … cache_lookup)."
        + overhead_note,
        "s",
        [Query(quantile(0.95, catalog.STAGE_GROUP_DURATION, 'group="gateway_overhead"'))],
        thresholds=overhead_steps,
    )
    b.stat(
        "overview:cache_hit_rate", "Prompt-cache hit rate", "Cached prompt tokens ÷ all prompt tokens.", "percentunit",
        [Query(_cache_hit_rate())], decimals=1,
    )  # fmt: skip
    b.stat(
        "overview:tokens", "Tokens/s", "Input and output tokens per second (cached tokens are part of input).",
        "short", [Query(sum_rate(sel(catalog.TOKENS_TOTAL, 'type=~"input|output"')))],
    )  # fmt: skip


def _traffic(b: Board, marks: SloMarks) -> None:
    b.row("row:traffic", "Traffic and errors")
    b.timeseries(
        "traffic:requests_by_route", "Requests/s by route", "Finished requests per second, per route.", "reqps",
        [Query(sum_rate(_requests(), ["route"]), "{{route}}")], w=8,
    )  # fmt: skip
    b.timeseries(
        "traffic:error_ratio_by_route",
        "Error ratio (5xx) by route",
        "Share of each route's requests answered with a 5xx status (the availability SLI)." + marks.error_note(),
        "percentunit",
        [Query(_error_ratio(("route",)), "{{route}}")],
        w=8, thresholds=marks.error_steps(), threshold_style="dashed", minimum=0,
    )  # fmt: skip
    b.timeseries(
        "traffic:responses_by_code", "Responses/s by status code",
        "Responses per second by HTTP status: 4xx are client errors (auth, validation, rate limits), 5xx ours.",
        "reqps", [Query(sum_rate(_requests(), ["code"]), "{{code}}")], w=8,
    )  # fmt: skip


def _where_time_goes(b: Board, stages: StageCatalog) -> None:
    b.row("row:time", "Where the time goes (before the first token)")
    pre_first_token = [s for s in stages.names_with_unattributed if s == UNATTRIBUTED or stages[s].before_first_token]
    stage_sum = sel(f"{catalog.STAGE_DURATION}_sum", f'stage=~"{"|".join(pre_first_token)}"')
    queries = [Query(mean(catalog.STAGE_DURATION, f'stage="{s}"'), s) for s in pre_first_token]
    b.timeseries(
        "stages:mean",
        "Mean time per stage, stacked in pipeline order",
        "Mean time each request spends in each stage before the first token, stacked in request order; "
        "'unattributed' is the time no stage covers, so the top of the stack is the mean time to first token. "
        "Means add up; percentiles do not.",
        "s",
        queries,
        w=16, h=9, stacked=True,
    )  # fmt: skip
    share = (
        f"sum by (stage) (increase({stage_sum}[$__range]))\n/ ignoring (stage) group_left ()\n"
        f"(sum(increase({stage_sum}[$__range])) > 0)"
    )
    b.table(
        "stages:share",
        "Share of time before the first token, by stage",
        "Each stage's share of all pre-first-token time over the selected time range: the stage to look at first.",
        "percentunit",
        [Query(share, instant=True)],
        w=8, h=9, sort_by="Value",
    )  # fmt: skip


def _stage_percentiles(b: Board, stages: StageCatalog, marks: SloMarks) -> None:
    b.row("row:stages", "Latency per stage (p50 / p95 / p99)")
    for stage in stages.names_with_unattributed:
        meaning, owner = _stage_description(stage, stages)
        slo_steps, note = marks.latency(catalog.STAGE_DURATION, "Dashed line", stage=stage)
        b.timeseries(
            stage_latency_key(stage),
            f"{stage} — p50 / p95 / p99 (owner: {owner})",
            f"{meaning} Owned by {owner}. Percentiles over the selected routes.{note}",
            "s",
            _percentiles(catalog.STAGE_DURATION, f'stage="{stage}"'),
            w=8, h=7, thresholds=slo_steps, threshold_style="dashed" if slo_steps else "off",
        )  # fmt: skip
    for group in stages.groups:
        slo_steps, note = marks.latency(catalog.STAGE_GROUP_DURATION, "Dashed line", group=group.name)
        b.timeseries(
            stage_latency_key(group.name),
            f"{group.name} — p50 / p95 / p99 (owner: {common.literal(group.owner)})",
            f"{group.meaning} Stages: {', '.join(group.stages)}. Owned by {common.literal(group.owner)}.{note}",
            "s",
            _percentiles(catalog.STAGE_GROUP_DURATION, f'group="{group.name}"'),
            w=8, h=7, thresholds=slo_steps, threshold_style="dashed" if slo_steps else "off",
        )  # fmt: skip


def _ttft_tpot(b: Board, marks: SloMarks) -> None:
    b.row("row:ttft", "Time to first token and time per output token")
    panels = (
        ("ttft:latency", "Time to first token — p50 / p95 / p99",
         "Time from the request's arrival at the gateway to the first output token (all stages before decode).",
         catalog.TIME_TO_FIRST_TOKEN, None),
        ("ttft:p95_by_route", "Time to first token p95 by route", "95th percentile of TTFT for each route.",
         catalog.TIME_TO_FIRST_TOKEN,
         [Query(quantile(0.95, catalog.TIME_TO_FIRST_TOKEN, group=["route"]), "{{route}}")]),
        ("tpot:latency", "Time per output token — p50 / p95 / p99",
         "Mean time per output token after the first, per request (the decode speed users feel while streaming).",
         catalog.TIME_PER_OUTPUT_TOKEN, None),
        ("request:latency", "Request duration — p50 / p95 / p99",
         "Whole request duration at the gateway, to the last byte.", catalog.REQUEST_DURATION, None),
    )  # fmt: skip
    for key, title, description, histogram, queries in panels:
        slo_steps, note = marks.latency(histogram, "Dashed line")
        b.timeseries(
            key, title, description + note, "s", queries or _percentiles(histogram),
            thresholds=slo_steps, threshold_style="dashed" if slo_steps else "off",
        )  # fmt: skip


def _routing_admission(b: Board) -> None:
    b.row("row:route_schedule", "Routing and admission")
    decisions = sel(catalog.ROUTE_DECISIONS_TOTAL)
    b.timeseries(
        "route:decisions_by_backend", "Routing decisions/s by backend",
        "Requests sent to each backend per second; a skew shows prefix affinity or an ejected backend.", "reqps",
        [Query(sum_rate(decisions, ["backend"]), "{{backend}}")], w=8,
    )  # fmt: skip
    b.timeseries(
        "route:decisions_by_reason", "Routing decisions/s by reason",
        "Why the router chose a backend (prefix affinity, least load, fallback …).", "reqps",
        [Query(sum_rate(decisions, ["reason"]), "{{reason}}")], w=8,
    )  # fmt: skip
    b.timeseries(
        "route:backends_up", "Backends healthy", "1 per backend that is healthy and not ejected by the router.",
        "none", [Query(f"sum by (backend) ({sel(catalog.BACKEND_UP)})", "{{backend}}")], w=8, minimum=0,
    )  # fmt: skip
    b.timeseries(
        "schedule:admission", "Admission: running and queued",
        "Requests admitted and running in the gateway, and requests waiting for admission.", "short",
        [
            Query(f"sum({sel(catalog.ADMISSION_INFLIGHT)})", "running"),
            Query(f"sum({sel(catalog.ADMISSION_QUEUE_DEPTH)})", "queued"),
        ],
        w=8,
    )  # fmt: skip
    b.timeseries(
        "schedule:rejections", "Admission rejections/s by reason",
        "Requests turned away by admission control (queue full, timed out while queued, a tenant's request rate "
        "or token budget).", "reqps",
        [Query(f"{sum_rate(sel(catalog.ADMISSION_REJECTIONS_TOTAL), ['reason'])} or vector(0)", "{{reason}}")], w=8,
    )  # fmt: skip
    b.timeseries(
        "route:inflight_by_backend", "Requests in flight by backend",
        "Requests the gateway has in flight at each backend: the load the router balances.", "short",
        [Query(f"sum by (backend) ({sel(catalog.BACKEND_INFLIGHT)})", "{{backend}}")], w=8,
    )  # fmt: skip
    b.timeseries(
        "route:index_blocks_by_backend", "Prefix index blocks by backend",
        "Prompt blocks the gateway's prefix index holds for each backend. A prompt with no cached prefix goes to "
        "the backend holding the fewest (per weight) unless it is overloaded, so a backend far below the others "
        "(restarted, ejected, newly added) takes the new prefixes until its load passes the balance thresholds.",
        "short", [Query(f"sum by (backend) ({sel(catalog.PROMPT_CACHE_INDEX_BLOCKS)})", "{{backend}}")], w=8,
    )  # fmt: skip
    b.stat(
        "gateway:config_reload", "Last configuration reload",
        "1 (OK) unless the gateway's last configuration reload (SIGHUP or POST /admin/reload) failed; it then runs "
        "the configuration from before. The log says which section and why.", "none",
        [Query(f"min({sel(catalog.CONFIG_LAST_RELOAD_SUCCESSFUL)})")], w=8,
        thresholds=steps(("red", None), ("green", 1)), graph=False, no_value="No gateway",
    )  # fmt: skip


def _prompt_cache(b: Board) -> None:
    b.row("row:cache", "Prompt cache")
    predicted = sel(catalog.PROMPT_CACHE_PREDICTED_TOKENS_TOTAL)
    # The prediction has no model label: compare it with the cached tokens of every model, not the selected ones.
    actual = sel(catalog.TOKENS_TOTAL, 'type="cached"', 'route=~"$route"', scoped=False)
    b.timeseries(
        "cache:hit_rate", "Prompt-cache hit rate by route (cached ÷ prompt tokens)",
        "Share of each route's prompt tokens the backend served from its prefix cache (KV reuse).", "percentunit",
        [Query(_cache_hit_rate(("route",)), "{{route}}")], minimum=0, maximum=1,
    )  # fmt: skip
    b.timeseries(
        "cache:predicted_vs_actual", "Cached tokens/s: predicted vs actual",
        "Prompt tokens per second the gateway predicted would be cached, next to what the backend reported. A gap "
        "means the gateway's view of the backends' caches has drifted (eviction, routing, TTL).", "short",
        [
            Query(sum_rate(predicted, ["route"]), "{{route}} predicted"),
            Query(sum_rate(actual, ["route"]), "{{route}} actual"),
        ],
    )  # fmt: skip
    b.timeseries(
        "cache:lookups", "Prompt-cache lookups/s by result",
        "Gateway prompt-cache lookups by result: hit, partial, miss, bypass.", "ops",
        [Query(sum_rate(sel(catalog.PROMPT_CACHE_LOOKUPS_TOTAL), ["result"]), "{{result}}")],
    )  # fmt: skip
    b.timeseries(
        "cache:prediction_accuracy", "Actual ÷ predicted cached tokens by route",
        "Backend-reported cached tokens divided by the gateway's prediction; 100% means the prediction holds.",
        "percentunit",
        [Query(ratio(zero_if_absent(sum_rate(actual, ["route"]), sum_rate(predicted, ["route"])),
                     sum_rate(predicted, ["route"])), "{{route}}")],
        minimum=0,
    )  # fmt: skip


def _tokens_row(b: Board) -> None:
    b.row("row:tokens", "Tokens and tenants")
    tokens = sel(catalog.TOKENS_TOTAL)
    billable = sel(catalog.TOKENS_TOTAL, 'type=~"input|output"')
    b.timeseries(
        "tokens:by_type", "Tokens/s by type",
        "Tokens per second: input (all prompt tokens), cached (the part of input served from cache), output.",
        "short", [Query(sum_rate(tokens, ["type"]), "{{type}}")], w=8,
    )  # fmt: skip
    b.timeseries(
        "tokens:top_tenants_rate", "Tokens/s of the top 10 tenants",
        "Input + output tokens per second of the ten tenants with the most tokens over the whole time range "
        "(chosen once, so the graph shows the same ten throughout).", "short",
        [Query(f"{sum_rate(billable, ['tenant'])}\nand on (tenant)\n"
               f"topk(10, sum by (tenant) (increase({billable}[$__range] @ end())))", "{{tenant}}")], w=8,
    )  # fmt: skip
    b.table(
        "tokens:top_tenants", "Top tenants by tokens (time range)",
        "The ten tenants with the most input + output tokens over the selected time range.", "short",
        [Query(f"topk(10, {sum_increase(billable, ['tenant'])})", instant=True)], w=8, sort_by="Value",
    )  # fmt: skip
    b.timeseries(
        "health:label_overflow", "Label values folded into __other__/s",
        "The instrumentation's cardinality guard replacing new label values with __other__: raise its limits or "
        "fix the label source (e.g. a route label built from raw paths).", "ops",
        [Query(f"{sum_rate(sel(catalog.LABEL_OVERFLOW_TOTAL), ['metric', 'label'])} or vector(0)",
               "{{metric}} {{label}}")], w=8,
    )  # fmt: skip
    b.timeseries(
        "health:usage_failures", "Usage records lost/s by sink",
        "Usage records a ledger sink failed to write (disk full, permissions, a locked SQLite database): the "
        "requests were served, their token accounting is missing from that sink. The gateway logs the error once "
        "a minute while it lasts.", "ops",
        [Query(f"{sum_rate(sel(catalog.USAGE_RECORD_FAILURES_TOTAL), ['sink'])} or vector(0)", "{{sink}}")], w=8,
    )  # fmt: skip
