"""The "Backends" dashboard: SGLang (or the embedded engine) as the engines themselves report it.

Engine metrics are matched in both spellings (``sglang:`` on a worker's ``/metrics``, ``sglang_`` through
sglang-router's ``/engine_metrics``); a backend is identified by ``instance`` (direct scrape) or ``worker_addr``
(through the router). Scrape each worker once, one way or the other, or its series are counted twice.
"""

from __future__ import annotations

from grafanalib.core import Dashboard, Templating

from llmpath.dashboards import common
from llmpath.dashboards.panels import Board, Query, steps
from llmpath.dashboards.promql import quantile, ratio, sel, sum_rate, zero_if_absent
from llmpath.instrumentation import catalog

BACKEND = ("instance", "worker_addr")
BACKEND_LEGEND = "{{instance}}{{worker_addr}}"
PERCENTILES = (0.5, 0.95, 0.99)
KV_STEPS = steps(("green", None), ("yellow", 0.8), ("red", 0.95))


def _engine(name: str, *matchers: str) -> str:
    return sel(f"sglang:{name}", *matchers)


def _by_backend(expr: str) -> Query:
    return Query(expr, BACKEND_LEGEND)


def _cache_hit_rate(group: tuple[str, ...] = ()) -> str:
    prompt = sum_rate(_engine("prompt_tokens_total"), group)
    return ratio(zero_if_absent(sum_rate(_engine("cached_tokens_total"), group), prompt), prompt)


def variables() -> Templating:
    """datasource, route (gateway metrics) and model (the engines' ``model_name``)."""
    return Templating(
        list=[
            common.datasource_variable(),
            common.label_variable("route", "Route", catalog.REQUESTS_TOTAL),
            common.label_variable("model", "Model", '{__name__=~"sglang[:_]num_requests_total"}', "model_name"),
        ]
    )


def build() -> Dashboard:
    """Build the Backends dashboard (grafanalib object; see :func:`llmpath.dashboards.grafana.finalize`)."""
    b = Board(common.SAMPLE_VARIABLES)
    _overview(b)
    _load(b)
    _latency(b)
    _cache(b)
    _tokens_routing(b)
    return common.dashboard(
        "backends",
        "llmpath / Backends",
        "The serving engines (SGLang or llmpath's embedded engine) as they report themselves: queues, running "
        "requests, TTFT and inter-token latency, prefix-cache hit rate from token counters, token usage, and the "
        "gateway's routing share per backend.",
        b,
        variables(),
        tags=["backends"],
    )


def _overview(b: Board) -> None:
    b.row("row:backends_overview", "Overview")
    up = sel(catalog.BACKEND_UP)
    b.stat(
        "backends:healthy", "Backends healthy / registered",
        "Backends the gateway's router considers healthy (not ejected), and all it knows.", "none",
        [Query(f"sum({up})", "healthy"), Query(f"count({up})", "registered")], graph=False,
    )  # fmt: skip
    b.stat(
        "backends:running", "Running requests", "Requests in the engines' running batches.", "short",
        [Query(f"sum({_engine('num_running_reqs')})")],
    )  # fmt: skip
    b.stat(
        "backends:queued", "Queued requests", "Requests waiting in the engines' queues for a batch slot.", "short",
        [Query(f"sum({_engine('num_queue_reqs')})")], thresholds=steps(("green", None), ("yellow", 1), ("red", 20)),
    )  # fmt: skip
    b.stat(
        "backends:ttft_p95", "Engine TTFT p95", "95th percentile of time to first token measured by the engines.",
        "s", [Query(quantile(0.95, "sglang:time_to_first_token_seconds"))],
    )  # fmt: skip
    b.stat(
        "backends:cache_hit_rate", "Engine prefix-cache hit rate",
        "Cached prompt tokens ÷ prompt tokens from the engines' counters (not the cache_hit_rate gauge, which "
        "covers only the last stats interval and cannot be averaged).", "percentunit",
        [Query(_cache_hit_rate())], decimals=1,
    )  # fmt: skip
    b.stat(
        "backends:generation", "Generated tokens/s", "Output tokens per second across engines.", "short",
        [Query(sum_rate(_engine("generation_tokens_total")))],
    )  # fmt: skip


def _load(b: Board) -> None:
    b.row("row:backends_load", "Queues and load (scheduling)")
    group = ", ".join(BACKEND)
    b.timeseries(
        "backends:queue_length", "Queue length by backend",
        "Requests waiting for a batch slot on each engine; a growing queue means the engine is saturated.", "short",
        [_by_backend(f"sum by ({group}) ({_engine('num_queue_reqs')})")], w=8,
    )  # fmt: skip
    b.timeseries(
        "backends:running_by_backend", "Running requests by backend",
        "Requests in each engine's running batch.", "short",
        [_by_backend(f"sum by ({group}) ({_engine('num_running_reqs')})")], w=8,
    )  # fmt: skip
    b.timeseries(
        "backends:kv_usage", "KV cache pool usage by backend",
        "Occupancy of each engine's KV token pool (0-1); near 1 the engine queues or retracts requests.",
        "percentunit",
        [_by_backend(f"max by ({group}) ({_engine('token_usage')})")],
        w=8, thresholds=KV_STEPS, threshold_style="line", minimum=0, maximum=1,
    )  # fmt: skip
    b.timeseries(
        "backends:queue_time", "Queue time p95 by backend",
        "95th percentile of the time requests waited in each engine's queue before their first forward pass.", "s",
        [_by_backend(quantile(0.95, "sglang:queue_time_seconds", group=BACKEND))], w=12,
    )  # fmt: skip
    b.timeseries(
        "backends:aborted", "Aborted requests/s by backend",
        "Requests the engines aborted (client disconnects, errors).", "reqps",
        [_by_backend(f"{sum_rate(_engine('num_aborted_requests_total'), BACKEND)} or vector(0)")], w=12,
    )  # fmt: skip


def _latency(b: Board) -> None:
    b.row("row:backends_latency", "Latency (prefill and decode)")
    ttft = "sglang:time_to_first_token_seconds"
    b.timeseries(
        "backends:ttft", "Engine TTFT — p50 / p95 / p99",
        "Time to first token measured by the engines (queue + prefill).", "s",
        [Query(quantile(q, ttft), f"p{round(q * 100)}") for q in PERCENTILES], w=8,
    )  # fmt: skip
    b.timeseries(
        "backends:itl", "Inter-token latency — p50 / p95 / p99",
        "Time between output tokens during decode (batch interval ÷ new tokens).", "s",
        [Query(quantile(q, "sglang:inter_token_latency_seconds"), f"p{round(q * 100)}") for q in PERCENTILES], w=8,
    )  # fmt: skip
    b.timeseries(
        "backends:prefill_forward", "Prefill forward p95 by backend",
        "95th percentile of prefill on each engine: whole prefills (prefill_forward, first forward entry to the "
        "first token) and, with chunked prefill, each chunk but the last (chunked_prefill). Grows with uncached "
        "prompt tokens and GPU saturation.", "s",
        [_by_backend(quantile(0.95, "sglang:per_stage_req_latency_seconds", 'stage=~"prefill_forward|chunked_prefill"',
                              group=BACKEND))], w=8,
    )  # fmt: skip
    gateway_ttft = sel(f"{catalog.TIME_TO_FIRST_TOKEN}_bucket", 'route=~"$route"', scoped=False)
    b.timeseries(
        "backends:gateway_vs_engine_ttft", "TTFT p95: gateway vs engines",
        "95th percentile of TTFT seen by the gateway (selected routes) next to the engines' own. The gap is the "
        "gateway's stages before the backend call plus the network.", "s",
        [
            Query(f"histogram_quantile(0.95, {sum_rate(gateway_ttft, ['le'])})", "gateway"),
            Query(quantile(0.95, ttft), "engines"),
        ],
    )  # fmt: skip
    b.timeseries(
        "backends:e2e_by_backend", "Engine request latency p95 by backend",
        "95th percentile of end-to-end request latency at each engine.", "s",
        [_by_backend(quantile(0.95, "sglang:e2e_request_latency_seconds", group=BACKEND))],
    )  # fmt: skip


def _cache(b: Board) -> None:
    b.row("row:backends_cache", "Prefix cache (KV reuse)")
    b.timeseries(
        "backends:cache_hit_rate_by_backend", "Prefix-cache hit rate by backend (cached ÷ prompt tokens)",
        "Share of each engine's prompt tokens served from its radix cache, from the cached_tokens_total and "
        "prompt_tokens_total counters.", "percentunit",
        [_by_backend(_cache_hit_rate(BACKEND))], minimum=0, maximum=1,
    )  # fmt: skip
    b.timeseries(
        "backends:evictions", "Evicted cache tokens/s by backend",
        "Tokens evicted from each engine's prefix cache; rising evictions with a falling hit rate mean the cache "
        "is too small for the working set of prefixes.", "short",
        [_by_backend(f"{sum_rate(_engine('evicted_tokens_total'), BACKEND)} or vector(0)")],
    )  # fmt: skip


def _tokens_routing(b: Board) -> None:
    b.row("row:backends_tokens", "Tokens and routing")
    b.timeseries(
        "backends:tokens", "Token throughput by backend",
        "Prompt and generated tokens per second on each engine.", "short",
        [
            Query(sum_rate(_engine("prompt_tokens_total"), BACKEND), f"{BACKEND_LEGEND} prompt"),
            Query(sum_rate(_engine("generation_tokens_total"), BACKEND), f"{BACKEND_LEGEND} generated"),
        ],
        w=8,
    )  # fmt: skip
    decisions = sel(catalog.ROUTE_DECISIONS_TOTAL)
    share = (
        f"sum by (backend) (rate({decisions}[$__rate_interval]))\n/ ignoring (backend) group_left ()\n"
        f"(sum(rate({decisions}[$__rate_interval])) > 0)"
    )
    b.timeseries(
        "backends:routing_share", "Routing share per backend",
        "Share of the gateway's routing decisions that went to each backend (stacked to 100%). Prefix affinity "
        "skews it on purpose; a backend at 0 was ejected or is unhealthy.", "percentunit",
        [Query(share, "{{backend}}")], w=8, stacked=True, minimum=0, maximum=1,
    )  # fmt: skip
    b.timeseries(
        "backends:gen_throughput", "Generation throughput by backend (engine gauge)",
        "Decode throughput each engine reports in its stats log (tokens/s).", "short",
        [_by_backend(f"max by ({', '.join(BACKEND)}) ({_engine('gen_throughput')})")], w=8,
    )  # fmt: skip
