"""The gateway-facing API: stage as decorator and context manager, no-ops outside requests, labels, annotations,
trace-header helpers, the cardinality guard and the multiprocess helpers."""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry

from llmpath.instrumentation import (
    STAGES,
    CardinalityGuard,
    LLMPathMiddleware,
    Stage,
    annotate_request,
    current_request,
    get_instrumentation,
    httpx_trace_hook,
    inject_trace_headers,
    instrument_app,
    mark_first_token,
    model_call_span,
    record_stage,
    record_usage,
    set_request_labels,
    stage,
)
from llmpath.instrumentation.multiprocess import mark_process_dead, prepare_multiprocess_dir


@stage("validate")
def validate_sync(x: int) -> int:
    return x * 2


@stage("assemble", retriever="folder")
async def assemble_async(x: int) -> int:
    await asyncio.sleep(0.002)
    return x + 1


def test_everything_is_a_cheap_noop_outside_a_request():
    with stage("auth") as s:
        s.set_attribute("k", "v")
    assert validate_sync(2) == 4
    assert asyncio.run(assemble_async(1)) == 2
    record_stage("prefill", 0.1)
    mark_first_token()
    record_usage(input_tokens=1, cached_tokens=0, output_tokens=1, model="m")
    set_request_labels(route="r")
    annotate_request(x=1)
    assert current_request() is None
    assert inject_trace_headers({}) == {}  # no span, no request: nothing to propagate


def test_invalid_stage_names_are_rejected_early():
    for bad in ("Auth", "1st", "has space", "unattributed", ""):
        with pytest.raises(ValueError):
            stage(bad)
    with pytest.raises(ValueError, match="source"):
        record_stage("prefill", 0.1, source="gpu")


async def test_decorated_stages_and_custom_stage_names(make_harness):
    app = FastAPI()
    catalog = STAGES.with_stage(Stage("moderation", "Content moderation.", "trust-safety"))
    h = make_harness(app=app, catalog=catalog)

    @app.get("/decorated")
    async def decorated() -> dict[str, int]:
        a = validate_sync(3)  # a sync function decorated with @stage
        b = await assemble_async(a)
        async with stage("moderation"):
            pass
        return {"value": b}

    async with h.client() as c:
        assert (await c.get("/decorated")).json() == {"value": 7}
    rec = h.records[0]
    assert [s.name for s in rec.stages] == ["validate", "assemble", "moderation"]
    assert rec.stages[1].duration_s >= 0.002
    assert h.span("llmpath.assemble").attributes["retriever"] == "folder"
    assert h.span("llmpath.moderation").attributes["llmpath.stage.owner"] == "trust-safety"
    assert h.value("llmpath_stage_duration_seconds_count", stage="moderation", route="/decorated") == 1


async def test_labels_annotations_and_current_request(make_harness):
    app = FastAPI()
    h = make_harness(app=app)
    seen: dict = {}

    @app.get("/labels")
    async def labels() -> dict[str, bool]:
        req = current_request()
        seen["start"] = req.start_time
        with stage("auth"):
            pass
        set_request_labels(route="chat", model="m1", tenant="t1", provider="openai")
        annotate_request(backend="b1")
        annotate_request(routing_reason="prefix_affinity", matched_prefix_tokens=64)
        record_usage(input_tokens=10, cached_tokens=4, output_tokens=2, model="ignored-model", tenant="ignored")
        record_usage(input_tokens=5, cached_tokens=1, output_tokens=3, model="m1")  # a second call adds up
        seen["timeline"] = [t.name for t in req.timeline()]
        seen["route"] = req.route
        seen["request_id"] = req.request_id
        return {"ok": True}

    async with h.client() as c:
        r = await c.get("/labels")
    rec = h.records[0]
    assert seen["timeline"] == ["auth"] and seen["route"] == "chat"
    assert seen["request_id"] == rec.request_id == r.headers["x-request-id"]
    assert abs(seen["start"] - rec.time) < 1e-3
    assert (rec.route, rec.model, rec.tenant) == ("chat", "m1", "t1")
    assert (rec.input_tokens, rec.cached_tokens, rec.output_tokens) == (15, 5, 5)
    assert rec.extra == {"backend": "b1", "routing_reason": "prefix_affinity", "matched_prefix_tokens": 64}
    assert h.value("llmpath_tokens_total", route="chat", model="m1", tenant="t1", type="cached") == 5


async def test_inject_trace_headers_and_httpx_hook_sync_and_async(harness):
    app = harness.app
    seen: dict = {}

    def echo(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=dict(request.headers))

    def sync_call(transport: httpx.MockTransport) -> dict:
        with httpx.Client(transport=transport, event_hooks={"request": [httpx_trace_hook]}) as sc:
            return sc.get("http://backend/x").json()

    @app.get("/hooks")
    async def hooks() -> dict[str, bool]:
        transport = httpx.MockTransport(echo)
        with model_call_span("m", provider="openai") as call:
            async with httpx.AsyncClient(transport=transport, event_hooks={"request": [httpx_trace_hook]}) as ac:
                seen["async"] = (await ac.get("http://backend/x")).json()
            seen["sync"] = sync_call(transport)  # MockTransport: no I/O happens
            seen["dict"] = inject_trace_headers({"x-request-id": "kept"})
            call.mark_first_chunk()
        return {"ok": True}

    async with harness.client() as c:
        r = await c.get("/hooks")
    call = harness.span("chat m")
    expected = f"00-{call.context.trace_id:032x}-{call.context.span_id:016x}-"
    for how in ("async", "sync"):
        assert seen[how]["traceparent"].startswith(expected), how
        assert seen[how]["x-request-id"] == r.headers["x-request-id"]
    assert seen["dict"]["x-request-id"] == "kept" and seen["dict"]["traceparent"].startswith(expected)
    assert call.attributes["gen_ai.provider.name"] == "openai"
    assert call.attributes["gen_ai.response.time_to_first_chunk"] >= 0


async def test_genai_metrics_through_a_configured_meter_provider(make_harness):
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    h = make_harness(meter_provider=meter_provider)
    async with h.client() as c:
        await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        await c.get("/items/1")  # no model: not a GenAI request
    data = reader.get_metrics_data()
    points: dict[str, list] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                points.setdefault(m.name, []).extend(m.data.data_points)
    for name in (
        "gen_ai.server.request.duration",
        "gen_ai.server.time_to_first_token",
        "gen_ai.server.time_per_output_token",
    ):
        [point] = points[name]
        assert point.count == 1, name
        assert dict(point.attributes) == {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "sglang",
            "gen_ai.request.model": "tiny-llama",
        }
    tokens = {dict(p.attributes)["gen_ai.token.type"]: p.sum for p in points["gen_ai.client.token.usage"]}
    assert tokens == {"input": 120, "output": 5}
    assert points["gen_ai.client.operation.duration"][0].count == 1
    meter_provider.shutdown()


def test_model_call_span_outside_a_request_uses_the_global_tracer():
    with model_call_span("m") as call:
        call.set_usage(input_tokens=1, output_tokens=1)
        call.set_response(response_id="x", response_model="m")
        call.set_error("backend_unavailable")


def test_cardinality_guard_caps_per_label():
    guard = CardinalityGuard({"route": 2, "*": 1})
    assert [guard.admit("route", v) for v in ("a", "b", "c", "a")] == ["a", "b", "__other__", "a"]
    assert guard.admit("model", "x") == "x" and guard.admit("model", "y") == "__other__"
    assert guard.admitted("route") == {"a", "b"} and guard.cap("tenant") == 1
    with pytest.raises(ValueError, match="positive"):
        CardinalityGuard({"route": 0})


async def test_middleware_for_plain_asgi_apps_and_lookup():
    async def raw(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    closed = []

    class Sink:
        def write(self, record):
            pass

        def close(self):
            closed.append(True)

    wrapped = instrument_app(raw, registry=CollectorRegistry(), usage_sink=Sink())
    assert isinstance(wrapped, LLMPathMiddleware)
    assert get_instrumentation(wrapped) is wrapped.instrumentation
    with pytest.raises(LookupError):
        get_instrumentation(FastAPI())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=wrapped), base_url="http://x") as c:
        r = await c.get("/anything")
    assert r.status_code == 204 and "x-request-id" in r.headers
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    async def receive():
        return next(messages)

    async def send(message):
        pass

    await wrapped({"type": "lifespan"}, receive, send)
    assert closed == [True]  # sinks are closed on shutdown


def test_prepare_multiprocess_dir_only_removes_metric_files(tmp_path, monkeypatch):
    # Work inside tmp_path only: even a regression here can never reach the repository.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")  # recorded, so the variable is restored afterwards
    target = tmp_path / "mp"
    target.mkdir()
    (target / "counter_1.db").write_text("stale")
    (target / "notes.txt").write_text("not ours")
    assert prepare_multiprocess_dir(target) == target.resolve()
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(target.resolve())
    mark_process_dead(12345)  # no files for that pid: nothing to remove, no error
    created = prepare_multiprocess_dir(tmp_path / "new" / "dir")
    assert created.is_dir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")
    for bad in (None, "", "  "):
        with pytest.raises(ValueError, match="pass a directory"):
            prepare_multiprocess_dir(bad)
    with pytest.raises(ValueError, match="refusing"):
        prepare_multiprocess_dir("/")
    assert (tmp_path / "mp" / "notes.txt").exists()
