"""Span tree and attributes, read back through the OTel SDK's in-memory exporter."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode

from llmpath.instrumentation import STAGES, UsageRecord, current_request, stage

STAGE_NAMES = ["auth", "validate", "route", "assemble", "cache_lookup", "schedule", "prefill", "decode"]
BODY = {"model": "tiny-llama", "messages": [{"role": "user", "content": "SECRET-PROMPT-TEXT"}]}


async def test_span_tree_one_server_span_with_eight_stage_children(make_harness, fast_spans):
    h = make_harness(fast_spans=fast_spans)
    async with h.client() as c:
        r = await c.post("/v1/chat/completions", json=BODY)
    assert r.status_code == 200
    spans = h.spans()
    servers = [s for s in spans if s.kind is SpanKind.SERVER]
    assert len(servers) == 1
    server = servers[0]
    assert server.name == "POST /v1/chat/completions"
    assert server.parent is None
    assert server.attributes["http.route"] == "/v1/chat/completions"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["llmpath.route.name"] == "chat"
    assert server.attributes["llmpath.model"] == "tiny-llama"
    assert server.attributes["llmpath.request_id"] == r.headers["x-request-id"]

    stages = {s.attributes["llmpath.stage.name"]: s for s in spans if s.name.startswith("llmpath.")}
    assert sorted(stages) == sorted(STAGE_NAMES)
    call = h.span("chat tiny-llama")
    for name, span in stages.items():
        assert span.name == f"llmpath.{name}"
        assert span.kind is SpanKind.INTERNAL
        assert span.context.trace_id == server.context.trace_id
        assert span.attributes["llmpath.route.name"] == "chat"  # the gateway's route, set after auth/validate ran
        assert span.attributes["llmpath.stage.owner"] == STAGES.owner(name)
        expected_source = "backend" if name in ("prefill", "decode") else "gateway"
        assert span.attributes["llmpath.timing.source"] == expected_source
        assert span.end_time >= span.start_time
        # Gateway stages are children of the request; the backend's are children of the model call.
        expected_parent = call if expected_source == "backend" else server
        assert span.parent.span_id == expected_parent.context.span_id, name
    assert stages["route"].attributes["llmpath.backend"] == "engine-a"
    assert stages["assemble"].attributes["documents"] == 2
    # A stage span lasts what the stage lasted (asyncio.sleep(0.004) inside auth).
    assert (stages["auth"].end_time - stages["auth"].start_time) / 1e9 >= 0.004
    # No per-ASGI-message spans, nothing else.
    assert len(spans) == 1 + len(STAGE_NAMES) + 1


async def test_model_call_span_has_genai_attributes_and_no_content(make_harness, fast_spans):
    h = make_harness(fast_spans=fast_spans)
    async with h.client() as c:
        await c.post("/v1/chat/completions", json=BODY)
    call = h.span("chat tiny-llama")
    server = h.span("POST /v1/chat/completions")
    assert call.kind is SpanKind.CLIENT
    assert call.parent.span_id == server.context.span_id
    a = call.attributes
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "sglang"
    assert a["gen_ai.request.model"] == "tiny-llama"
    assert a["server.address"] == "127.0.0.1"
    assert a["server.port"] == 9000
    assert a["gen_ai.usage.input_tokens"] == 120
    assert a["gen_ai.usage.output_tokens"] == 5
    assert a["gen_ai.usage.cache_read.input_tokens"] == 96
    assert tuple(a["gen_ai.response.finish_reasons"]) == ("stop",)
    assert "gen_ai.request.stream" not in a  # stream=False
    dumped = json.dumps([dict(s.attributes) for s in h.spans()] + [s.name for s in h.spans()])
    assert "SECRET-PROMPT-TEXT" not in dumped


async def test_exception_in_stage_marks_span_error_and_propagates(make_harness, fast_spans):
    h = make_harness(fast_spans=fast_spans)
    async with h.client() as c:
        with pytest.raises(RuntimeError):
            await c.get("/boom")
    route = h.span("llmpath.route")
    assert route.status.status_code is StatusCode.ERROR
    assert route.attributes["error.type"] == "RuntimeError"
    server = h.span("GET /boom")
    assert server.status.status_code is StatusCode.ERROR
    assert server.attributes["http.response.status_code"] == 500
    assert server.attributes["error.type"] == "RuntimeError"
    # The exception message may carry prompt text: it is not recorded anywhere.
    assert all(not s.events for s in h.spans())
    assert "prompt text" not in json.dumps([dict(s.attributes) for s in h.spans()])
    assert "prompt text" not in str([s.status.description for s in h.spans()])
    assert h.records[0].status_code == 500 and h.records[0].error == "RuntimeError"


async def test_http_error_status_is_not_a_span_error(harness):
    async with harness.client() as c:
        r = await c.get("/teapot")
    assert r.status_code == 418
    server = harness.span("GET /teapot")
    assert server.status.status_code is StatusCode.UNSET
    assert server.attributes["http.response.status_code"] == 418


async def test_spans_created_inside_a_stage_nest_under_it(make_harness, fast_spans):
    app = FastAPI()
    h = make_harness(app=app, fast_spans=fast_spans)
    tracer = h.provider.get_tracer("user-code")

    @app.get("/nested")
    async def nested() -> dict[str, bool]:
        with stage("assemble"), tracer.start_as_current_span("retrieval docs"):
            pass
        return {"ok": True}

    async with h.client() as c:
        await c.get("/nested")
    assemble = h.span("llmpath.assemble")
    retrieval = h.span("retrieval docs")
    assert retrieval.parent.span_id == assemble.context.span_id
    assert retrieval.context.trace_id == assemble.context.trace_id


async def test_unsampled_requests_create_no_spans_but_keep_metrics_and_trace_id(make_harness):
    h = make_harness(sampler=ALWAYS_OFF)
    seen: dict[str, Any] = {}
    app = h.app

    @app.get("/peek")
    async def peek() -> dict[str, bool]:
        req = current_request()
        assert req is not None
        seen["sampled"] = req.sampled
        seen["trace_id"] = req.trace_id
        with stage("auth"):
            pass
        return {"ok": True}

    async with h.client() as c:
        await c.post("/v1/chat/completions", json=BODY)
        await c.get("/peek")
    assert h.spans() == []
    assert seen["sampled"] is False and len(seen["trace_id"]) == 32
    assert h.value("llmpath_stage_duration_seconds_count", stage="auth", route="chat") == 1
    assert h.records[1].trace_id == seen["trace_id"]


async def test_incoming_traceparent_is_the_parent(harness):
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = "00f067aa0ba902b7"
    async with harness.client() as c:
        await c.get("/items/7", headers={"traceparent": f"00-{trace_id}-{parent}-01"})
    server = harness.span("GET /items/{item_id}")
    assert format(server.context.trace_id, "032x") == trace_id
    assert format(server.parent.span_id, "016x") == parent
    assert server.parent.is_remote
    assert harness.records[0].trace_id == trace_id


async def test_fastapi_instrumentor_server_span_is_reused_never_two(make_harness, fast_spans):
    app = FastAPI()
    h = make_harness(app=app, fast_spans=fast_spans)

    @app.get("/both")
    async def both() -> dict[str, bool]:
        with stage("auth"):
            pass
        return {"ok": True}

    FastAPIInstrumentor.instrument_app(app, tracer_provider=h.provider, exclude_spans=["receive", "send"])
    try:
        async with h.client() as c:
            r = await c.get("/both")
        spans = h.spans()
        servers = [s for s in spans if s.kind is SpanKind.SERVER]
        assert len(servers) == 1, [s.name for s in spans]
        server = servers[0]
        assert server.instrumentation_scope.name.startswith("opentelemetry.instrumentation")
        assert server.attributes["llmpath.request_id"] == r.headers["x-request-id"]
        assert server.attributes["llmpath.route.name"] == "/both"
        assert h.span("llmpath.auth").parent.span_id == server.context.span_id
    finally:
        FastAPIInstrumentor.uninstrument_app(app)


@pytest.mark.parametrize("first", ["llmpath", "opentelemetry"])
async def test_uncaught_500_page_has_the_request_id_under_the_fastapi_instrumentor(make_harness, first):
    """opentelemetry-instrumentation-fastapi rebuilds the stack around a copy of Starlette's error layer, whichever
    of the two instruments the app first; the 500 page still gets the request id."""
    from llmpath.instrumentation import instrument_app

    app = FastAPI()

    @app.get("/fail")
    async def fail() -> None:
        raise RuntimeError("boom")

    h = make_harness(app=FastAPI())  # only for its provider, registry and records
    if first == "opentelemetry":
        FastAPIInstrumentor.instrument_app(app, tracer_provider=h.provider, exclude_spans=["receive", "send"])
        instrument_app(app, registry=h.registry, tracer_provider=h.provider, usage_sink=h.records.append)
    else:
        instrument_app(app, registry=h.registry, tracer_provider=h.provider, usage_sink=h.records.append)
        FastAPIInstrumentor.instrument_app(app, tracer_provider=h.provider, exclude_spans=["receive", "send"])
    try:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            r = await c.get("/fail")
    finally:
        FastAPIInstrumentor.uninstrument_app(app)
    assert r.status_code == 500 and r.text == "Internal Server Error"
    assert r.headers.get_list("x-request-id") == [h.records[0].request_id]
    servers = [s for s in h.spans() if s.kind is SpanKind.SERVER]
    assert len(servers) == 1 and servers[0].attributes["llmpath.request_id"] == h.records[0].request_id


@pytest.mark.skipif(not hasattr(FastAPI(), "_native_telemetry"), reason="FastAPI without native telemetry")
async def test_fastapi_native_telemetry_server_span_is_reused_never_two(make_harness, fast_spans):
    """FastAPI's own OpenTelemetry support (on by default where a tracer provider is configured) makes the SERVER
    span outside every middleware: llmpath adds its attributes and stages to it instead of making a second."""
    from llmpath.instrumentation import instrument_app

    h = make_harness(fast_spans=fast_spans)
    app = FastAPI(telemetry={"tracer_provider": h.provider, "metrics": False, "logs": False})

    @app.get("/items/{item}")
    async def item(item: str) -> dict[str, str]:
        with stage("auth"):
            pass
        return {"item": item}

    instrument_app(app, registry=h.registry, tracer_provider=h.provider, usage_sink=h.records.append)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        r = await c.get("/items/a1")
    assert r.status_code == 200
    spans = h.spans()
    servers = [s for s in spans if s.kind is SpanKind.SERVER]
    assert len(servers) == 1, [s.name for s in spans]
    server = servers[0]
    assert server.instrumentation_scope.name == "fastapi"
    assert server.attributes["llmpath.request_id"] == r.headers["x-request-id"]
    assert server.attributes["llmpath.route.name"] == "/items/{item}"
    auth = h.span("llmpath.auth")
    assert auth.context.trace_id == server.context.trace_id
    assert h.records[0].trace_id == format(server.context.trace_id, "032x")


async def test_no_sdk_configured_passes_the_callers_trace_through():
    """With the API's no-op tracer, the caller's trace id still reaches the ledger and downstream headers."""
    from prometheus_client import CollectorRegistry

    from llmpath.instrumentation import inject_trace_headers, instrument_app

    app = FastAPI()
    records: list[UsageRecord] = []
    instrument_app(
        app, registry=CollectorRegistry(), tracer_provider=trace.NoOpTracerProvider(), usage_sink=records.append
    )
    seen: dict[str, str] = {}

    @app.get("/down")
    async def down() -> dict[str, bool]:
        seen.update(inject_trace_headers({}))
        return {"ok": True}

    trace_id = "0af7651916cd43dd8448eb211c80319c"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        await c.get("/down", headers={"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"})
    assert records[0].trace_id == trace_id
    assert seen["traceparent"].split("-")[1] == trace_id
