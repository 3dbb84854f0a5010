"""LLMPathMiddleware around Litestar, Quart, Django (ASGI) and Falcon (``falcon.asgi``), driven in process: spans,
metrics, TTFT, usage records, errors, client disconnects, route labels, lifespan and websockets.

The apps are in ``apps/instr_framework_apps.py``; ``test_instr_frameworks_servers.py`` serves them over loopback.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry

from llmpath.instrumentation import LLMPathMiddleware, UsageRecord

from .conftest import tracer_provider

sys.path.insert(0, str(Path(__file__).parent / "apps"))
fw: Any = importlib.import_module("instr_framework_apps")  # the servers import it by this name too

WEBSOCKETS = ("litestar", "quart", "falcon")  # Django's ASGI handler has no websockets (Channels adds them)
#: The ``route`` label of ``/items/7``: Litestar's own template; the others' with the documented one-line hook.
ITEM_ROUTES = {
    "litestar": "/items/{item_id}",
    "quart": "/items/<int:item_id>",
    "django": "/items/<int:item_id>",
    "falcon": "/items/{item_id:int}",
}


class ClosingSink:
    """A usage sink that remembers its records and whether it was closed (lifespan shutdown closes sinks)."""

    def __init__(self) -> None:
        self.records: list[UsageRecord] = []
        self.closed = False

    def write(self, record: UsageRecord) -> None:
        self.records.append(record)

    def close(self) -> None:
        self.closed = True


@dataclass
class Served:
    """One framework app wrapped in LLMPathMiddleware, with its exporter, registry and sink."""

    app: LLMPathMiddleware
    exporter: InMemorySpanExporter
    provider: TracerProvider
    registry: CollectorRegistry
    sink: ClosingSink = field(default_factory=ClosingSink)

    @property
    def records(self) -> list[UsageRecord]:
        return self.sink.records

    def spans(self) -> list[ReadableSpan]:
        self.provider.force_flush()
        return list(self.exporter.get_finished_spans())

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def client(self) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
        return httpx.AsyncClient(transport=transport, base_url="http://gw")


@pytest.fixture
def serve() -> Iterator[Any]:
    providers: list[TracerProvider] = []

    def make(framework: str) -> Served:
        provider, exporter = tracer_provider()
        providers.append(provider)
        registry = CollectorRegistry()
        sink = ClosingSink()
        # Django's settings are per process: always with its route hook (the others' default is tested too).
        app = fw.BUILDERS[framework](labelled=framework in ("quart", "falcon", "django"))
        wrapped = LLMPathMiddleware(app, registry=registry, tracer_provider=provider, usage_sink=sink)
        return Served(wrapped, exporter, provider, registry, sink)

    yield make
    for provider in providers:
        provider.shutdown()


frameworks = pytest.mark.parametrize("framework", fw.FRAMEWORKS)


@frameworks
async def test_json_endpoint_one_server_span_with_its_stages_metrics_and_usage(serve: Any, framework: str) -> None:
    s = serve(framework)
    async with s.client() as client:
        r = await client.post("/v1/chat", json={"q": "hi"})
    assert r.status_code == 200 and r.json()["echo"] == "hi"
    request_id = r.headers["x-request-id"]
    assert r.json()["request_id"] == request_id
    [server] = [sp for sp in s.spans() if sp.kind is SpanKind.SERVER]
    stages = {sp.name: sp for sp in s.spans() if sp.kind is SpanKind.INTERNAL}
    assert set(stages) == {"llmpath.auth", "llmpath.route"}
    assert all(sp.parent is not None and sp.parent.span_id == server.context.span_id for sp in stages.values())
    attrs = dict(server.attributes or {})
    assert attrs["llmpath.request_id"] == request_id and attrs["http.response.status_code"] == 200
    assert attrs["llmpath.route.name"] == "/v1/chat" and attrs["llmpath.model"] == "tiny"
    [rec] = s.records
    assert (rec.request_id, rec.route, rec.model, rec.tenant, rec.status_code) == (
        request_id,
        "/v1/chat",
        "tiny",
        "acme",
        200,
    )
    assert (rec.input_tokens, rec.cached_tokens, rec.output_tokens) == (12, 4, 3)
    assert [st.name for st in rec.stages] == ["auth", "route"] and rec.stages[0].duration_s >= 0.002
    assert rec.ttft_s is not None and rec.ttft_s >= rec.stages[0].duration_s  # mark_first_token after the stages
    assert s.value("llmpath_requests_total", route="/v1/chat", model="tiny", code="200") == 1
    assert s.value("llmpath_request_duration_seconds_count", route="/v1/chat", model="tiny") == 1
    assert s.value("llmpath_stage_duration_seconds_count", stage="auth", route="/v1/chat") == 1
    assert s.value("llmpath_time_to_first_token_seconds_count", route="/v1/chat", model="tiny") == 1
    assert s.value("llmpath_tokens_total", route="/v1/chat", model="tiny", tenant="acme", type="cached") == 4


@frameworks
async def test_streamed_response_ttft_is_the_first_chunk(serve: Any, framework: str) -> None:
    s = serve(framework)
    delay, tokens = 0.03, 4
    async with s.client() as client:
        r = await client.get("/v1/stream", params={"tokens": tokens, "delay": delay})
    assert r.status_code == 200 and r.text.count("data: ") == tokens
    [rec] = s.records
    assert rec.status_code == 200 and rec.error is None and rec.output_tokens == tokens
    assert [st.name for st in rec.stages] == ["schedule"]
    # The first event follows the schedule stage; the stream goes on for (tokens) more delays.
    assert rec.ttft_s is not None and delay <= rec.ttft_s < rec.duration_s - (tokens - 1) * delay
    assert rec.tpot_s == pytest.approx((rec.duration_s - rec.ttft_s) / (tokens - 1), rel=1e-3)
    assert s.value("llmpath_time_to_first_token_seconds_count", route="/v1/stream", model="tiny") == 1
    [server] = [sp for sp in s.spans() if sp.kind is SpanKind.SERVER]
    [sched] = [sp for sp in s.spans() if sp.name == "llmpath.schedule"]
    assert sched.parent is not None and sched.parent.span_id == server.context.span_id


@frameworks
async def test_exception_in_the_app_is_a_500_with_its_class(serve: Any, framework: str) -> None:
    """Django, Quart and Falcon send their 500 page after their except block: the class comes from the stage."""
    s = serve(framework)
    async with s.client() as client:
        r = await client.get("/boom", headers={"x-request-id": "boom-1"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "boom-1"
    [rec] = s.records
    assert (rec.request_id, rec.status_code, rec.error, rec.ttft_s) == ("boom-1", 500, "BackendDown", None)
    [server] = [sp for sp in s.spans() if sp.kind is SpanKind.SERVER]
    assert server.status.status_code is StatusCode.ERROR
    assert (server.attributes or {})["error.type"] == "BackendDown"
    assert "prompt text" not in repr([sp.to_json() for sp in s.spans()])
    assert s.value("llmpath_requests_total", route="/boom", model="unknown", code="500") == 1


@pytest.mark.parametrize("framework", ["quart", "django", "falcon"])
async def test_the_documented_exception_hook_names_an_error_outside_every_stage(serve: Any, framework: str) -> None:
    """Without a stage to learn it from, the framework's exception hook the docs show names the error."""
    s = serve(framework)
    async with s.client() as client:
        assert (await client.get("/crash")).status_code == 500  # no hook: a 500 with no error type
        disconnect = fw.install_error_hook(framework, s.app.app)
        try:
            r = await client.get("/crash")
        finally:
            disconnect()
    assert r.status_code == 500
    assert [(rec.status_code, rec.error) for rec in s.records] == [(500, None), (500, "LookupError")]
    assert s.value("llmpath_requests_total", route="/crash", model="unknown", code="500") == 2


@frameworks
async def test_route_label_is_the_template(serve: Any, framework: str) -> None:
    """Litestar's template is read from the scope; the others get it from the hook the docs show."""
    s = serve(framework)
    async with s.client() as client:
        for i in (1, 2, 3):
            assert (await client.get(f"/items/{i}")).json() == {"item": i}
        assert (await client.get("/no/such/7")).status_code == 404
    template = ITEM_ROUTES[framework]
    assert [rec.route for rec in s.records[:3]] == [template] * 3
    assert s.value("llmpath_requests_total", route=template, model="unknown", code="200") == 3
    server_names = {sp.name for sp in s.spans() if sp.kind is SpanKind.SERVER}
    if framework == "litestar":  # a template the middleware itself knows also names the span and http.route
        assert f"GET {template}" in server_names
        assert s.records[3].route == "__unmatched__"
    else:  # no route matched: no hook ran, the path it is (bounded by the cardinality guard)
        assert s.records[3].route == "/no/such/7"


async def test_quart_and_falcon_without_the_hook_label_the_path(serve: Any) -> None:
    for framework in ("quart", "falcon"):
        provider, exporter = tracer_provider()
        registry = CollectorRegistry()
        sink = ClosingSink()
        app = LLMPathMiddleware(fw.BUILDERS[framework](), registry=registry, tracer_provider=provider, usage_sink=sink)
        async with Served(app, exporter, provider, registry, sink).client() as client:
            await client.get("/items/5")
        assert [rec.route for rec in sink.records] == ["/items/5"]
        provider.shutdown()


async def drive(app: Any, scope: dict[str, Any], incoming: asyncio.Queue[dict[str, Any]]) -> list[dict[str, Any]]:
    """Call an ASGI app with messages from ``incoming``; returns what it sent."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope, incoming.get, send), 10)
    return sent


def http_scope(path: str, query: bytes = b"") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": [(b"host", b"gw")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
        "extensions": {},
    }


@frameworks
async def test_client_leaving_mid_stream_is_499(serve: Any, framework: str) -> None:
    """The client leaves after the first event. Falcon's SSE stops and still ends the response normally: the
    disconnect it received is what tells the middleware (before, it was recorded as a complete 200)."""
    s = serve(framework)
    incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    incoming.put_nowait({"type": "http.request", "body": b"", "more_body": False})
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body") and len(sent) == 2:
            incoming.put_nowait({"type": "http.disconnect"})

    scope = http_scope("/v1/stream", b"tokens=50&delay=0.02")
    await asyncio.wait_for(s.app(scope, incoming.get, send), 10)
    [rec] = s.records
    assert rec.status_code == 499 and rec.error == "client_disconnect"
    assert rec.ttft_s is not None and rec.duration_s < 50 * 0.02 / 2
    assert s.value("llmpath_requests_total", route="/v1/stream", model="unknown", code="499") == 1


@pytest.mark.parametrize("framework", WEBSOCKETS)
async def test_websocket_passes_through_untouched(serve: Any, framework: str) -> None:
    s = serve(framework)
    incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for message in ({"type": "websocket.connect"}, {"type": "websocket.receive", "text": "abc"}):
        incoming.put_nowait(message)
    scope = {**http_scope("/ws"), "type": "websocket", "scheme": "ws", "subprotocols": []}
    del scope["method"]
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "websocket.send":
            incoming.put_nowait({"type": "websocket.disconnect", "code": 1000})

    await asyncio.wait_for(s.app(scope, incoming.get, send), 10)
    assert sent[0]["type"] == "websocket.accept"
    assert all(k != b"x-request-id" for k, _ in sent[0].get("headers", []))  # no request id: not an HTTP request
    assert {"type": "websocket.send", "text": "cba"} in [{k: m[k] for k in ("type", "text") if k in m} for m in sent]
    assert s.records == [] and s.spans() == []
    assert s.value("llmpath_requests_total", route="/ws", model="unknown", code="200") == 0


@frameworks
async def test_lifespan_passes_through_and_shutdown_closes_the_sinks(serve: Any, framework: str) -> None:
    s = serve(framework)
    fw.EVENTS.clear()
    incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for message in ({"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}):
        incoming.put_nowait(message)
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
    if framework == "django":  # Django has no lifespan: it refuses the scope, and the server carries on without
        with pytest.raises(ValueError, match="lifespan"):
            await drive(s.app, scope, incoming)
        assert not s.sink.closed
        return
    sent = await drive(s.app, scope, incoming)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert fw.EVENTS == ["startup", "shutdown"]
    assert s.sink.closed
