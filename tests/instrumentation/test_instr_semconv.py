"""The SERVER span and the OTel metrics follow the HTTP and GenAI semantic conventions: ``error.type`` on a 5xx,
no status for a response never sent, ``_OTHER`` for unknown methods, ``http.server.request.duration``, and the
operation and backend of the model call on the GenAI metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from opentelemetry import trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry

from llmpath.instrumentation import fail_request, instrument_app, model_call_span, record_usage
from llmpath.instrumentation.genai import GenAIMetrics
from tests.instrumentation.conftest import Meters, metric_points


def semconv_app() -> FastAPI:
    app = FastAPI()

    @app.get("/ok")
    async def ok() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/unavailable")
    async def unavailable() -> JSONResponse:  # an error answered without an exception
        return JSONResponse({"error": "no backend"}, status_code=503)

    @app.get("/bad")
    async def bad() -> JSONResponse:
        return JSONResponse({"error": "bad"}, status_code=400)

    @app.post("/v1/completions")
    async def completions() -> dict[str, str]:
        with model_call_span("tiny", operation="text_completion", server_address="10.0.0.7", server_port=30000) as c:
            c.set_usage(input_tokens=9, output_tokens=2)
        record_usage(input_tokens=9, cached_tokens=0, output_tokens=2, model="tiny")
        return {"text": "ab"}

    @app.post("/v1/chat/completions")
    async def chat(stream: bool = True) -> dict[str, float]:
        before_first = after_last = 0.0
        with model_call_span("tiny", server_address="10.0.0.7", server_port=30000, stream=stream) as c:
            for i in range(4 if stream else 0):  # a streamed call: four chunks, 10 ms apart
                await asyncio.sleep(0.01)
                if i == 0:
                    before_first = time.perf_counter()
                c.mark_chunk()
            after_last = time.perf_counter()
        return {"first_to_last": after_last - before_first}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def tokens() -> Any:
            for i in range(5):
                yield f"data: {i}\n\n"
                await asyncio.sleep(0)

        return StreamingResponse(tokens(), media_type="text/event-stream")

    return app


async def test_the_server_span_follows_the_http_conventions(make_harness) -> None:
    h = make_harness(app=semconv_app())
    async with h.client(headers={"user-agent": "sdk/1.2"}) as c:
        assert (await c.get("/unavailable")).status_code == 503
        assert (await c.get("/bad")).status_code == 400
        assert (await c.request("PURGE", "/ok")).status_code == 405
    unavailable = h.span("GET /unavailable")
    assert unavailable.status.status_code is StatusCode.ERROR and not unavailable.status.description
    assert unavailable.attributes["error.type"] == "503"  # the status code, as the conventions say
    assert unavailable.attributes["http.response.status_code"] == 503
    bad = h.span("GET /bad")
    assert bad.status.status_code is StatusCode.UNSET and "error.type" not in bad.attributes  # a 4xx is no error
    [purge] = [s for s in h.spans() if s.attributes["http.request.method"] == "_OTHER"]
    assert purge.name.startswith("HTTP") and purge.attributes["http.request.method_original"] == "PURGE"
    attrs = bad.attributes
    assert (attrs["server.address"], attrs["user_agent.original"], attrs["network.protocol.version"]) == (
        "gw",
        "sdk/1.2",
        "1.1",
    )
    assert "client.address" not in attrs  # privacy: not recorded


async def test_http_server_request_duration_is_recorded_once(meters: Meters, make_harness) -> None:
    h = make_harness(app=semconv_app(), meter_provider=meters.provider)
    async with h.client() as c:
        await c.get("/ok")
        await c.get("/unavailable")
        await c.request("PURGE", "/ok")
    by_status = {
        p.attributes.get("http.response.status_code"): p for p in meters.points()["http.server.request.duration"]
    }
    assert set(by_status) == {200, 503, 405}
    assert dict(by_status[200].attributes) == {
        "http.request.method": "GET",
        "url.scheme": "http",
        "http.route": "/ok",
        "http.response.status_code": 200,
    }
    assert by_status[503].attributes["error.type"] == "503"
    assert by_status[405].attributes["http.request.method"] == "_OTHER"
    assert all(p.count == 1 for p in by_status.values())
    assert by_status[200].explicit_bounds[:3] == (0.005, 0.01, 0.025)  # the conventions' advice

    # With opentelemetry-instrumentation-fastapi outside, its SERVER span and its duration metric are the ones.
    app = semconv_app()
    reader2 = InMemoryMetricReader()
    outer_meters = MeterProvider(metric_readers=[reader2])
    h2 = make_harness(app=app, meter_provider=outer_meters)
    FastAPIInstrumentor.instrument_app(app, tracer_provider=h2.provider, meter_provider=outer_meters)
    try:
        async with h2.client() as c:
            await c.get("/ok")
        names = metric_points(reader2)
        # the instrumentor's (its semconv opt-in decides the name: http.server.duration by default), not llmpath's
        assert "http.server.request.duration" not in names and names["http.server.duration"][0].count == 1
    finally:
        FastAPIInstrumentor.uninstrument_app(app)
    outer_meters.shutdown()


async def test_genai_metrics_carry_the_calls_operation_and_backend(meters: Meters, make_harness) -> None:
    h = make_harness(app=semconv_app(), meter_provider=meters.provider)
    async with h.client() as c:
        assert (await c.post("/v1/completions")).status_code == 200
    got = meters.points()
    [server] = got["gen_ai.server.request.duration"]
    assert server.attributes["gen_ai.operation.name"] == "text_completion"  # not "chat"
    [client] = got["gen_ai.client.operation.duration"]
    assert dict(client.attributes) == {
        "gen_ai.operation.name": "text_completion",
        "gen_ai.provider.name": "sglang",
        "gen_ai.request.model": "tiny",
        "server.address": "10.0.0.7",
        "server.port": 30000,
    }


async def test_time_per_output_chunk_for_each_chunk_after_the_first(meters: Meters, make_harness) -> None:
    h = make_harness(app=semconv_app(), meter_provider=meters.provider)
    async with h.client() as c:
        streamed = (await c.post("/v1/chat/completions")).json()
        assert (await c.post("/v1/chat/completions", params={"stream": "false"})).status_code == 200
    got = meters.points()
    [first] = got["gen_ai.client.operation.time_to_first_chunk"]  # the streamed call only
    [per_chunk] = got["gen_ai.client.operation.time_per_output_chunk"]
    assert first.count == 1 and per_chunk.count == 3
    assert 0.029 <= per_chunk.sum <= streamed["first_to_last"]  # three gaps of 10 ms sleeps, from the first chunk
    assert dict(per_chunk.attributes) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "sglang",
        "gen_ai.request.model": "tiny",
        "server.address": "10.0.0.7",
        "server.port": 30000,
    }
    [calls] = got["gen_ai.client.operation.duration"]
    assert calls.count == 2


async def _serve_until_the_client_leaves(app: Any, leave_after_bodies: int) -> None:
    """One GET /stream over ASGI whose client is gone after ``leave_after_bodies`` body messages (the server's
    send raises OSError, as uvicorn's does on a closed connection)."""
    bodies = 0

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(3600)  # no disconnect message: the failed send is how the app learns of it
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal bodies
        if message["type"] == "http.response.body":
            bodies += 1
            if bodies > leave_after_bodies:
                raise OSError("connection closed")

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
        "path": "/stream", "raw_path": b"/stream", "root_path": "", "query_string": b"", "headers": [],
        "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000),
    }  # fmt: skip
    with contextlib.suppress(OSError):
        await app(scope, receive, send)


async def test_a_client_that_left_keeps_the_status_it_was_sent(make_harness) -> None:
    """Mid-stream: the span keeps the 200 it sent and says client_disconnect; only the Prometheus code is 499."""
    h = make_harness(app=semconv_app())
    await _serve_until_the_client_leaves(h.app, leave_after_bodies=1)
    span = h.span("GET /stream")
    assert span.attributes["http.response.status_code"] == 200
    assert span.attributes["error.type"] == "client_disconnect"
    assert span.status.status_code is StatusCode.UNSET
    assert h.value("llmpath_requests_total", route="/stream", model="unknown", code="499") == 1


async def test_a_499_recorded_before_the_response_started_sends_no_status(meters: Meters, make_harness) -> None:
    """A gateway records a client that left before the response started by answering 499 to nobody: the span
    has no status code and says client_disconnect, and so does gen_ai.server.request.duration."""
    app = FastAPI()
    h = make_harness(app=app, meter_provider=meters.provider)

    @app.get("/left")
    async def left() -> JSONResponse:
        record_usage(input_tokens=3, cached_tokens=0, output_tokens=0, model="tiny")
        return JSONResponse({}, status_code=499)

    async with h.client() as c:
        await c.get("/left")
    span = h.span("GET /left")
    assert "http.response.status_code" not in span.attributes and span.attributes["error.type"] == "client_disconnect"
    [server] = meters.points()["gen_ai.server.request.duration"]
    assert server.attributes["error.type"] == "client_disconnect"
    [http] = meters.points()["http.server.request.duration"]
    assert "http.response.status_code" not in http.attributes and http.attributes["error.type"] == "client_disconnect"


async def test_a_stream_that_fails_after_its_200_counts_as_the_failure_it_was(meters: Meters, make_harness) -> None:
    """An SSE stream whose backend broke mid-way (fail_request before the error event): Prometheus, the usage record
    and the GenAI metric count a 502 with its error type; the span and the HTTP metric keep the 200 that was sent."""
    app = FastAPI()
    h = make_harness(app=app, meter_provider=meters.provider)

    @app.get("/broken")
    async def broken() -> StreamingResponse:
        async def events() -> Any:
            yield "data: {}\n\n"
            fail_request(502, "BackendUnreachable")
            yield 'data: {"error": {"code": "backend_error"}}\n\ndata: [DONE]\n\n'

        record_usage(input_tokens=3, cached_tokens=0, output_tokens=1, model="tiny")
        return StreamingResponse(events(), media_type="text/event-stream")

    async with h.client() as c:
        assert (await c.get("/broken")).status_code == 200
    assert h.value("llmpath_requests_total", route="/broken", model="tiny", code="502") == 1
    assert (h.records[0].status_code, h.records[0].error) == (502, "BackendUnreachable")
    span = h.span("GET /broken")
    assert span.attributes["http.response.status_code"] == 200 and span.attributes["error.type"] == "BackendUnreachable"
    assert span.status.status_code is StatusCode.ERROR
    [http] = meters.points()["http.server.request.duration"]
    assert http.attributes["http.response.status_code"] == 200 and http.attributes["error.type"] == "BackendUnreachable"
    [server] = meters.points()["gen_ai.server.request.duration"]
    assert server.attributes["error.type"] == "BackendUnreachable"
    with pytest.raises(ValueError, match="HTTP status"):
        fail_request(42, "x")


async def test_genai_model_attributes_are_bounded_like_the_labels(meters: Meters, make_harness) -> None:
    """A client choosing model names (a passthrough gateway) cannot grow the OTel series without bound either."""
    app = FastAPI()
    h = make_harness(app=app, meter_provider=meters.provider, max_label_values={"model": 2})

    @app.post("/v1/chat/completions/{model}")
    async def chat(model: str) -> dict[str, bool]:
        with model_call_span(model) as call:
            call.set_usage(input_tokens=1, output_tokens=1)
        return {"ok": True}

    async with h.client() as c:
        for model in ("a", "b", "junk-1", "junk-2", "a"):
            await c.post(f"/v1/chat/completions/{model}")
    got = meters.points()
    for name in ("gen_ai.server.request.duration", "gen_ai.client.operation.duration"):
        models = {p.attributes["gen_ai.request.model"]: p.count for p in got[name]}
        assert models == {"a": 2, "b": 1, "__other__": 2}, name
    assert h.value("llmpath_requests_total", route="/v1/chat/completions/{model}", model="__other__", code="200") == 2


async def test_no_http_duration_from_llmpath_when_the_fastapi_instrumentor_is_on_without_a_tracer_sdk() -> None:
    """Metrics configured, tracing not: the instrumentor's SERVER span is invisible (invalid), yet it records the
    HTTP metrics; llmpath notices the instrumentor itself and records none, in either order of instrumenting."""
    for llmpath_first in (True, False):
        app = semconv_app()
        reader = InMemoryMetricReader()
        meters = MeterProvider(metric_readers=[reader])
        no_sdk = trace.NoOpTracerProvider()
        llmpath_options = {"registry": CollectorRegistry(), "tracer_provider": no_sdk, "meter_provider": meters}
        if llmpath_first:
            instrument_app(app, **llmpath_options)
        FastAPIInstrumentor.instrument_app(app, tracer_provider=no_sdk, meter_provider=meters)
        if not llmpath_first:
            instrument_app(app, **llmpath_options)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
                assert (await c.get("/ok")).status_code == 200
            data = reader.get_metrics_data()
            assert data is not None
            scopes = {
                (sm.scope.name, m.name) for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
            }
            assert not {name for scope, name in scopes if scope == "llmpath.instrumentation"} & {
                "http.server.request.duration"
            }, llmpath_first
            assert any(name.startswith("http.server") for scope, name in scopes if scope != "llmpath.instrumentation")
        finally:
            FastAPIInstrumentor.uninstrument_app(app)
            meters.shutdown()


GLOBAL_METER_PROVIDER_LATER = r"""
import asyncio, json
import httpx
from fastapi import FastAPI
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry
from llmpath.instrumentation import instrument_app, model_call_span, record_usage

app = FastAPI()

@app.post("/v1/chat/completions")
async def chat() -> dict:
    with model_call_span("tiny") as call:
        call.set_usage(input_tokens=3, output_tokens=1)
    record_usage(input_tokens=3, cached_tokens=0, output_tokens=1, model="tiny")
    return {}

instrument_app(app, registry=CollectorRegistry())  # no meter_provider: the global one, not set yet

async def requests(n):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        for _ in range(n):
            assert (await c.post("/v1/chat/completions")).status_code == 200

genai = app.state.llmpath.genai
asyncio.run(requests(2))  # nothing to record into yet
before = genai.enabled()
reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
asyncio.run(requests(3))
counts = {"enabled_before": before, "enabled_after": genai.enabled()}
for rm in reader.get_metrics_data().resource_metrics:
    for sm in rm.scope_metrics:
        for m in sm.metrics:
            counts[m.name] = sum(getattr(p, "count", 0) for p in m.data.data_points)
print(json.dumps(counts))
"""


def test_global_meter_provider_set_after_instrumenting_gets_the_later_requests() -> None:
    """With no ``meter_provider``, the OTel metrics go to the global provider as soon as the application sets it,
    even after ``instrument_app``; requests before that record nothing (the API's stand-in is a no-op)."""
    run = subprocess.run(
        [sys.executable, "-c", GLOBAL_METER_PROVIDER_LATER], capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, run.stderr
    counts = json.loads(run.stdout.strip().splitlines()[-1])
    assert (counts["enabled_before"], counts["enabled_after"]) == (False, True)  # no attributes built meanwhile
    assert counts["gen_ai.server.request.duration"] == 3
    assert counts["http.server.request.duration"] == 3
    assert counts["gen_ai.client.operation.duration"] == 3
    assert counts["gen_ai.client.token.usage"] == 6  # input and output, per call


def test_genai_metrics_enabled_only_with_a_recording_provider() -> None:
    assert GenAIMetrics(MeterProvider()).enabled()
    assert not GenAIMetrics(NoOpMeterProvider()).enabled()
