"""Prometheus metric values read back from the registry, the /metrics endpoint, tiling and the cardinality cap."""

from __future__ import annotations

import asyncio
import gzip
import time

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.parser import text_string_to_metric_families

from llmpath.instrumentation import (
    LATENCY_BUCKETS,
    METRICS,
    STAGE_GROUPS,
    UNATTRIBUTED,
    catalog,
    current_request,
    get_instrumentation,
    mark_first_token,
    record_stage,
    record_usage,
    stage,
)
from llmpath.instrumentation.exposition import accepts_gzip, render
from tests.instrumentation.conftest import Meters

BODY = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hello"}]}
PRE_FIRST_TOKEN = ["auth", "validate", "route", "assemble", "cache_lookup", "schedule", "prefill"]


async def test_request_metrics_values(harness):
    async with harness.client() as c:
        for _ in range(3):
            assert (await c.post("/v1/chat/completions", json=BODY)).status_code == 200
    v = harness.value
    labels = {"route": "chat", "model": "tiny-llama"}
    assert v("llmpath_requests_total", code="200", **labels) == 3
    assert v("llmpath_request_duration_seconds_count", **labels) == 3
    assert v("llmpath_time_to_first_token_seconds_count", **labels) == 3
    assert v("llmpath_time_per_output_token_seconds_count", **labels) == 3
    assert v("llmpath_tokens_total", tenant="acme", type="input", **labels) == 360
    assert v("llmpath_tokens_total", tenant="acme", type="cached", **labels) == 288
    assert v("llmpath_tokens_total", tenant="acme", type="output", **labels) == 15
    for name in [*PRE_FIRST_TOKEN, "decode", UNATTRIBUTED]:
        assert v("llmpath_stage_duration_seconds_count", stage=name, route="chat") == 3, name
    # Three sleeps of 4 ms inside auth over three requests.
    assert v("llmpath_stage_duration_seconds_sum", stage="auth", route="chat") >= 3 * 0.004
    group = STAGE_GROUPS[0]
    assert v("llmpath_stage_group_duration_seconds_count", group=group.name, route="chat") == 3
    group_sum = v("llmpath_stage_group_duration_seconds_sum", group=group.name, route="chat")
    stages_sum = sum(v("llmpath_stage_duration_seconds_sum", stage=s, route="chat") for s in group.stages)
    assert group_sum == pytest.approx(stages_sum, rel=1e-9)
    # Duration ≥ TTFT ≥ the stages before it; TPOT = (end − first token) / (output − 1).
    rec = harness.records[0]
    assert rec.duration_s >= rec.ttft_s > 0
    assert rec.tpot_s == pytest.approx((rec.duration_s - rec.ttft_s) / 4, rel=1e-6)


async def test_tenant_only_on_token_counter(harness):
    async with harness.client() as c:
        await c.post("/v1/chat/completions", json=BODY)
    for family in harness.registry.collect():
        for sample in family.samples:
            if sample.name.startswith("llmpath_") and "tenant" in sample.labels:
                assert family.name == "llmpath_tokens", sample.name
    assert {m.name for m in METRICS if "tenant" in m.labels} == {catalog.TOKENS_TOTAL}


async def test_families_match_the_catalog(harness):
    async with harness.client() as c:
        await c.post("/v1/chat/completions", json=BODY)
    exposed: dict[str, set[str]] = {}
    for family in harness.registry.collect():
        for sample in family.samples:
            exposed.setdefault(sample.name, set()).update(k for k in sample.labels if k != "le")
    for name in (
        catalog.REQUESTS_TOTAL,
        catalog.REQUEST_DURATION,
        catalog.STAGE_DURATION,
        catalog.STAGE_GROUP_DURATION,
        catalog.TIME_TO_FIRST_TOKEN,
        catalog.TIME_PER_OUTPUT_TOKEN,
        catalog.TOKENS_TOTAL,
    ):
        spec = catalog.METRICS_BY_NAME[name]
        for series in spec.sample_names:
            assert exposed.get(series) == set(spec.labels), series


async def test_buckets_cover_slo_thresholds_and_long_requests(harness):
    for threshold in (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10):
        assert threshold in LATENCY_BUCKETS
    assert LATENCY_BUCKETS[0] < 0.001 and LATENCY_BUCKETS[-1] >= 120
    async with harness.client() as c:
        await c.post("/v1/chat/completions", json=BODY)
    le = {
        s.labels["le"]
        for f in harness.registry.collect()
        if f.name == "llmpath_request_duration_seconds"
        for s in f.samples
        if s.name.endswith("_bucket")
    }
    assert {"0.005", "0.1", "2.5", "120.0", "+Inf"} <= le


async def test_stage_tiling_sum_plus_unattributed_equals_ttft(make_harness):
    app = FastAPI()
    h = make_harness(app=app)

    @app.get("/tiled")
    async def tiled() -> dict[str, bool]:
        await asyncio.sleep(0.01)  # before any stage: unattributed
        for name in ("auth", "validate", "route"):
            with stage(name):
                await asyncio.sleep(0.005)
        await asyncio.sleep(0.01)  # a gap: unattributed
        with stage("schedule"):
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.008)
        record_stage("prefill", 0.008)  # measured by the backend: the last 8 ms
        mark_first_token()
        await asyncio.sleep(0.005)
        record_stage("decode", 0.005)
        return {"ok": True}

    async with h.client() as c:
        for _ in range(3):
            await c.get("/tiled")
    for rec in h.records:
        pre = [s for s in rec.stages if s.name != "decode"]
        total = sum(s.duration_s for s in pre) + rec.unattributed_s
        assert total == pytest.approx(rec.ttft_s, rel=0.01)
        assert rec.unattributed_s >= 0.02  # the two 10 ms gaps
    v = h.value
    stage_sum = sum(v("llmpath_stage_duration_seconds_sum", stage=s, route="/tiled") for s in PRE_FIRST_TOKEN)
    unattributed = v("llmpath_stage_duration_seconds_sum", stage=UNATTRIBUTED, route="/tiled")
    ttft = v("llmpath_time_to_first_token_seconds_sum", route="/tiled", model="unknown")
    assert stage_sum + unattributed == pytest.approx(ttft, rel=0.01)
    assert sum(r.unattributed_s for r in h.records) == pytest.approx(unattributed, rel=1e-6)


async def test_overlapping_and_repeated_stages_are_one_observation_and_never_double_count(make_harness):
    app = FastAPI()
    h = make_harness(app=app)

    @app.get("/repeat")
    def repeat() -> dict[str, bool]:  # a sync endpoint: runs in the thread pool with the request's context
        req = current_request()
        assert req is not None
        start = req.start
        record_stage("schedule", 0.002, end=start + 0.003, source="gateway")  # admission wait
        record_stage("schedule", 0.004, end=start + 0.006)  # the backend's queue, overlapping it
        mark_first_token(start + 0.010)
        time.sleep(0.011)
        return {"ok": True}

    async with h.client() as c:
        await c.get("/repeat")
    v = h.value
    assert v("llmpath_stage_duration_seconds_count", stage="schedule", route="/repeat") == 1
    assert v("llmpath_stage_duration_seconds_sum", stage="schedule", route="/repeat") == pytest.approx(0.006)
    rec = h.records[0]
    assert [s.source for s in rec.stages] == ["gateway", "backend"]
    assert rec.ttft_s == pytest.approx(0.010)
    # Union of [1,3] and [2,6] ms is 5 ms; TTFT 10 ms → 5 ms unattributed.
    assert rec.unattributed_s == pytest.approx(0.005, abs=1e-9)


async def test_first_non_empty_body_chunk_is_the_first_token(harness):
    async with harness.client() as c:
        r = await c.post("/v1/stream", json={"delay": 0.02, "tokens": 4})
    assert r.status_code == 200
    rec = harness.records[0]
    # schedule (20 ms) runs before the first chunk; the stream then takes 4 × 20 ms more.
    assert 0.02 <= rec.ttft_s < rec.duration_s
    assert rec.duration_s - rec.ttft_s >= 0.06
    assert rec.tpot_s == pytest.approx((rec.duration_s - rec.ttft_s) / 3, rel=1e-6)


async def test_a_head_response_has_no_first_token(make_harness):
    # An app answering HEAD with the GET body (as Starlette's routes do), which the server does not send: no token
    # reached anyone.
    app = FastAPI()

    @app.api_route("/page", methods=["GET", "HEAD"])
    async def page() -> dict[str, bool]:
        return {"ok": True}

    h = make_harness(app=app)
    async with h.client() as c:
        head = await c.head("/page")
        get = await c.get("/page")
    assert head.status_code == get.status_code == 200
    head_rec, get_rec = h.records
    assert head_rec.ttft_s is None and head_rec.unattributed_s is None
    assert get_rec.ttft_s is not None
    assert h.value("llmpath_time_to_first_token_seconds_count", route="/page", model="unknown") == 1


async def test_cardinality_cap_overflows_to_other_and_counts(make_harness):
    h = make_harness(max_label_values={"route": 3, "model": 2, "tenant": 2})
    async with h.client() as c:
        for name in ("a", "b", "c", "d", "e"):
            await c.get(f"/labelled/{name}")
    v = h.value
    routes = {s.labels["route"] for f in h.registry.collect() if f.name == "llmpath_requests" for s in f.samples}
    assert routes == {"a", "b", "c", "__other__"}
    assert v("llmpath_requests_total", route="a", model="model-a", code="200") == 1
    assert v("llmpath_requests_total", route="c", model="__other__", code="200") == 1
    assert v("llmpath_requests_total", route="__other__", model="__other__", code="200") == 2
    assert v("llmpath_tokens_total", route="a", model="model-a", tenant="tenant-a", type="input") == 3
    assert v("llmpath_tokens_total", route="__other__", model="__other__", tenant="__other__", type="output") == 4
    assert v("llmpath_label_overflow_total", metric="llmpath_requests_total", label="route") == 2
    assert v("llmpath_label_overflow_total", metric="llmpath_requests_total", label="model") == 3
    assert v("llmpath_label_overflow_total", metric="llmpath_tokens_total", label="tenant") == 3
    assert v("llmpath_label_overflow_total", metric="llmpath_stage_duration_seconds", label="route") == 2
    assert v("llmpath_label_overflow_total", metric="llmpath_stage_group_duration_seconds", label="route") == 2
    assert h.records[-1].route == "e"  # the ledger keeps the real values


async def test_a_scrape_of_the_overflow_counter_alone_counts_the_requests_not_folded_yet(make_harness):
    # Finished requests' observations are folded in batches; the fold counts a stage group's overflowed route.
    h = make_harness(max_label_values={"route": 1})
    async with h.client() as c:
        for name in ("a", "b", "c"):
            await c.get(f"/labelled/{name}")
        only = (await c.get("/metrics?name[]=llmpath_label_overflow_total")).text
    samples = {
        (s.labels["metric"], s.labels["label"]): s.value
        for family in text_string_to_metric_families(only)
        for s in family.samples
        if s.name == "llmpath_label_overflow_total"
    }
    assert samples[("llmpath_stage_group_duration_seconds", "route")] == 2
    assert samples[("llmpath_requests_total", "route")] == 2


async def test_unmatched_paths_share_one_route_label(harness):
    async with harness.client() as c:
        for i in range(5):
            assert (await c.get(f"/scan/{i}")).status_code == 404
    assert harness.value("llmpath_requests_total", route="__unmatched__", model="unknown", code="404") == 5


async def test_excluded_and_metrics_paths_get_no_telemetry(harness):
    async with harness.client() as c:
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/metrics")).status_code == 200
    assert harness.records == []
    assert harness.spans() == []


async def test_metrics_endpoint_plain_text_and_openmetrics_exemplars(harness):
    async with harness.client() as c:
        await c.post("/v1/chat/completions", json=BODY)
        plain = await c.get("/metrics")
        om = await c.get("/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})
        only = await c.get("/metrics?name[]=llmpath_requests_total")
        head = await c.head("/metrics")
        post = await c.post("/metrics")
    assert plain.headers["content-type"].startswith("text/plain")
    assert "# {" not in plain.text  # no exemplars in the Prometheus text format
    families = {f.name for f in text_string_to_metric_families(plain.text)}
    assert {"llmpath_requests", "llmpath_stage_duration_seconds", "llmpath_tokens"} <= families
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    trace_id = harness.records[0].trace_id
    exemplar_lines = [line for line in om.text.splitlines() if f'trace_id="{trace_id}"' in line]
    assert any(line.startswith("llmpath_time_to_first_token_seconds_bucket") for line in exemplar_lines)
    assert any(line.startswith("llmpath_stage_duration_seconds_bucket") for line in exemplar_lines)
    assert om.text.rstrip().endswith("# EOF")
    assert "llmpath_requests_total" in only.text and "llmpath_tokens_total" not in only.text
    assert head.status_code == 200 and head.content == b""
    assert post.status_code == 405


async def test_metrics_gzip(harness):
    async with harness.client() as c:
        raw = await c.get("/metrics", headers={"accept-encoding": "gzip"})
        refused = await c.get("/metrics", headers={"accept-encoding": "gzip;q=0, identity"})
    assert raw.headers["content-encoding"] == "gzip"
    assert "llmpath_label_overflow_total" in raw.text  # httpx decoded the gzip body
    assert "content-encoding" not in refused.headers and "llmpath_label_overflow_total" in refused.text


@pytest.mark.parametrize(
    ("header", "gzip_ok"),
    [
        ("gzip", True),
        ("deflate, gzip;q=1.0, *;q=0.5", True),
        ("GZIP; Q=0.3", True),
        ("*", True),
        ("gzip;q=0", False),
        ("gzip;q=0.000, *", False),  # an explicit refusal wins over the wildcard
        ("*;q=0", False),
        ("identity", False),
        ("br, deflate", False),
        ("gzip;q=junk", False),
    ],
)
def test_accept_encoding_q_values_decide_compression(header: str, gzip_ok: bool) -> None:
    assert accepts_gzip(header) is gzip_ok


def test_render_plain_registry():
    reg = CollectorRegistry()
    Counter("x_total", "x", registry=reg).inc()
    body, ctype = render(reg, "", b"")
    assert b"x_total 1.0" in body and ctype.startswith("text/plain")
    assert gzip.decompress(gzip.compress(body)) == body


async def test_gateway_metrics_on_the_same_registry(harness):
    instr = get_instrumentation(harness.app)
    lookups = instr.metric(catalog.PROMPT_CACHE_LOOKUPS_TOTAL)
    assert instr.metric(catalog.PROMPT_CACHE_LOOKUPS_TOTAL) is lookups
    assert isinstance(lookups, Counter)
    lookups.labels("chat", "hit").inc()
    backend_up = instr.metric(catalog.BACKEND_UP)
    assert isinstance(backend_up, Gauge)
    backend_up.labels("engine-a").set(1)
    assert harness.value("llmpath_prompt_cache_lookups_total", route="chat", result="hit") == 1
    assert harness.value("llmpath_backend_up", backend="engine-a") == 1
    with pytest.raises(KeyError, match="not in the catalog"):
        instr.metric("made_up_total")


async def test_unsampled_requests_carry_no_exemplars(make_harness):
    h = make_harness(sampler=ALWAYS_OFF)
    async with h.client() as c:
        await c.post("/v1/chat/completions", json=BODY)
        om = await c.get("/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})
    assert "trace_id" not in om.text


async def test_usage_outside_requests_is_a_noop_and_bad_counts_are_rejected():
    record_usage(input_tokens=1, cached_tokens=0, output_tokens=1, model="m")  # no request: nothing happens
    with pytest.raises(ValueError, match=">= 0"):
        record_usage(input_tokens=-1, cached_tokens=0, output_tokens=1, model="m")
    with pytest.raises(ValueError, match="cannot exceed"):
        record_usage(input_tokens=1, cached_tokens=2, output_tokens=1, model="m")


async def test_error_responses_have_no_first_token(meters: Meters, make_harness):
    """A 4xx body is not a token: no TTFT/TPOT observation, no ``unattributed`` stage, ``ttft_s`` is null —
    unless the app called ``mark_first_token()`` itself."""
    app = FastAPI()
    h = make_harness(app=app, meter_provider=meters.provider)

    @app.get("/denied")
    async def denied() -> JSONResponse:
        with stage("auth"):
            pass
        record_usage(input_tokens=0, cached_tokens=0, output_tokens=0, model="m")
        return JSONResponse({"error": {"message": "bad key"}}, status_code=401)

    @app.get("/limited")
    async def limited() -> JSONResponse:
        record_usage(input_tokens=4, cached_tokens=0, output_tokens=3, model="m")
        return JSONResponse({"error": {"message": "slow down"}}, status_code=429)

    @app.get("/marked")
    async def marked() -> JSONResponse:
        mark_first_token()  # the app says a token went out (e.g. a stream that then failed)
        record_usage(input_tokens=4, cached_tokens=0, output_tokens=3, model="m")
        return JSONResponse({"error": {"message": "failed late"}}, status_code=400)

    async with h.client() as c:
        assert (await c.get("/denied")).status_code == 401
        assert (await c.get("/limited")).status_code == 429
        assert (await c.get("/nowhere")).status_code == 404
        assert (await c.get("/marked")).status_code == 400
    v = h.value
    for route in ("/denied", "/limited", "__unmatched__"):
        model = "unknown" if route == "__unmatched__" else "m"
        assert v("llmpath_request_duration_seconds_count", route=route, model=model) == 1, route
        assert v("llmpath_time_to_first_token_seconds_count", route=route, model=model) == 0, route
        assert v("llmpath_time_per_output_token_seconds_count", route=route, model=model) == 0, route
        assert v("llmpath_stage_duration_seconds_count", stage=UNATTRIBUTED, route=route) == 0, route
    assert v("llmpath_stage_duration_seconds_count", stage="auth", route="/denied") == 1
    assert v("llmpath_time_to_first_token_seconds_count", route="/marked", model="m") == 1
    by_route = {r.route: r for r in h.records}
    for route in ("/denied", "/limited", "__unmatched__"):
        assert by_route[route].ttft_s is None and by_route[route].unattributed_s is None, route
        assert by_route[route].tpot_s is None, route
    assert by_route["/marked"].ttft_s is not None and by_route["/marked"].unattributed_s is not None
    genai = {name: sum(p.count for p in points) for name, points in meters.points().items()}
    assert genai["gen_ai.server.request.duration"] == 3  # the three requests with a model
    assert genai["gen_ai.server.time_to_first_token"] == 1  # only /marked
