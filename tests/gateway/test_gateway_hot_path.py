"""The completion endpoints' fast path (``HotPath``) answers exactly as the FastAPI app would: errors, fallthrough
for other methods and paths, the route template in the telemetry. In-process ASGI calls; no backend is reached."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from starlette.types import Message

from llmpath.gateway.app import HOT_ENDPOINTS, HotPath, create_app
from llmpath.gateway.config import hash_key, load_config
from llmpath.instrumentation import RequestLogFilter

KEY = "sk-hot-path-test"
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def hot(tmp_path) -> tuple[HotPath, InMemorySpanExporter, CollectorRegistry]:
    config = load_config(
        None,
        {
            "backends": [{"url": "http://127.0.0.1:9", "name": "nowhere"}],
            "routes": [{"name": "chat", "model": "m"}],
            "api_keys": [{"sha256": hash_key(KEY), "tenant": "acme"}],
        },
    )
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    registry = CollectorRegistry()
    return create_app(config, registry=registry, tracer_provider=provider), exporter, registry


def client(app: HotPath) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


async def test_errors_are_answered_like_the_fastapi_app(hot) -> None:
    app, exporter, registry = hot
    async with client(app) as c:
        denied = await c.post("/v1/chat/completions", json=CHAT)
        unknown = await c.post("/v1/completions", json={"model": "nope", "prompt": "x"}, headers=_auth())
        wrong_method = await c.get("/v1/chat/completions", headers=_auth())
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    assert denied.headers["x-request-id"]  # the llmpath middleware ran
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    assert wrong_method.status_code == 405  # not a hot path: FastAPI answers
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"
    records = app.state.waterfall.recent()
    assert {r.route for r in records} == {"/v1/chat/completions", "/v1/completions"}  # the route templates
    assert sorted(r.status_code for r in records) == [401, 404, 405]  # the 405 through the FastAPI app
    assert (
        registry.get_sample_value(
            "llmpath_requests_total", {"route": "/v1/chat/completions", "model": "unknown", "code": "401"}
        )
        == 1
    )
    names = {s.name for s in exporter.get_finished_spans() if s.kind.name == "SERVER"}
    assert names == {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/chat/completions"}


async def test_an_unexpected_error_is_an_openai_500_and_is_logged(hot, monkeypatch, caplog) -> None:
    app, _, _ = hot

    async def broken(request, kind):
        raise RuntimeError("boom")

    monkeypatch.setattr(app.gateway, "handle", broken)
    caplog.handler.addFilter(RequestLogFilter())  # as the gateway's log handler has it
    async with client(app) as c:
        r = await c.post("/v1/chat/completions", json=CHAT, headers=_auth())
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert "boom" not in r.text
    [logged] = [rec for rec in caplog.records if "unexpected error" in rec.message]
    assert logged.exc_info is not None and logged.request_id == r.headers["x-request-id"]
    assert app.state.waterfall.recent()[0].status_code == 500
    assert r.headers["x-request-id"] == app.state.waterfall.recent()[0].request_id


def test_the_hot_paths_are_the_documented_fastapi_routes(hot) -> None:
    app, _, _ = hot
    assert set(HOT_ENDPOINTS) <= set(app.app.openapi()["paths"])


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


async def test_stage_spans_name_the_owners_of_the_configured_stage_catalog(tmp_path) -> None:
    (tmp_path / "stages.toml").write_text('[owners]\nauth = "identity"\n')
    config = load_config(
        None,
        {
            "backends": [{"url": "http://127.0.0.1:9", "name": "nowhere"}],
            "routes": [{"name": "chat", "model": "m"}],
            "api_keys": [{"sha256": hash_key(KEY), "tenant": "acme"}],
            "stage_catalog": str(tmp_path / "stages.toml"),
        },
    )
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_app(config, registry=CollectorRegistry(), tracer_provider=provider)
    async with client(app) as c:
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 401
    owners = {
        s.attributes["llmpath.stage.name"]: s.attributes["llmpath.stage.owner"]
        for s in exporter.get_finished_spans()
        if s.attributes is not None and "llmpath.stage.name" in s.attributes
    }
    assert owners == {"auth": "identity"}  # the auth stage refused the request, under the configured owner


@pytest.mark.parametrize("trusted", [True, False])
async def test_a_clients_request_id_is_taken_only_when_trusted(trusted: bool) -> None:
    config = load_config(
        None,
        {
            "listen": {"trust_request_id": trusted},
            "backends": [{"url": "http://127.0.0.1:9", "name": "nowhere"}],
            "api_keys": [{"sha256": hash_key(KEY), "tenant": "acme"}],
        },
    )
    app = create_app(config, registry=CollectorRegistry(), tracer_provider=TracerProvider())
    async with client(app) as c:  # no key: even a refused request gets a record, under the id it was given
        resp = await c.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "chosen-by-client"})
    assert resp.status_code == 401
    [record] = app.state.waterfall.recent()
    assert record.request_id == resp.headers["x-request-id"]
    if trusted:
        assert record.request_id == "chosen-by-client"
    else:
        assert len(record.request_id) == 32 and int(record.request_id, 16) >= 0  # minted by the gateway


def _post_scope(body_len: int) -> dict:
    headers = [
        (b"host", b"gw"),
        (b"content-type", b"application/json"),
        (b"content-length", str(body_len).encode()),
        (b"authorization", f"Bearer {KEY}".encode()),
    ]
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "root_path": "", "query_string": b"",
        "headers": headers, "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000),
    }  # fmt: skip


async def _call_then_leave(app: HotPath, messages: list[dict], leave_after_s: float) -> list[Message]:
    """One POST whose client sends ``messages`` and then, ``leave_after_s`` later, disconnects."""
    sent: list[Message] = []

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(leave_after_s)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    body = sum(len(m.get("body", b"")) for m in messages)
    await asyncio.wait_for(app(_post_scope(body + 10), receive, send), 10)
    return sent


async def test_a_client_gone_while_its_body_arrives_is_a_499_not_a_server_error(hot, caplog) -> None:
    app, _exporter, registry = hot
    partial = {"type": "http.request", "body": b'{"model": "chat", "mess', "more_body": True}
    sent = await _call_then_leave(app, [partial], 0.0)
    assert sent[0]["status"] == 499  # recorded as the client's doing; nobody reads it
    [record] = app.state.waterfall.recent()
    assert (record.status_code, record.error) == (499, "client_disconnect")
    assert "unexpected error" not in caplog.text and "Traceback" not in caplog.text
    labels = {"route": "/v1/chat/completions", "model": "unknown", "code": "499"}
    assert registry.get_sample_value("llmpath_requests_total", labels) == 1


async def test_a_client_gone_while_queued_leaves_the_queue_at_once(tmp_path) -> None:
    config = load_config(
        None,
        {
            "backends": [{"url": "http://127.0.0.1:9", "name": "nowhere"}],
            "routes": [{"name": "chat", "model": "m"}],
            "api_keys": [{"sha256": hash_key(KEY), "tenant": "acme"}],
            "limits": {"max_concurrency": 1, "max_queue": 4, "timeouts": {"queue_s": 30}},
        },
    )
    registry = CollectorRegistry()
    app = create_app(config, registry=registry, tracer_provider=TracerProvider())
    admission = app.state.gateway.admission
    await admission.acquire()  # the only slot is taken: the next request queues
    body = json.dumps(CHAT).encode()
    started = time.perf_counter()
    sent = await _call_then_leave(app, [{"type": "http.request", "body": body, "more_body": False}], 0.3)
    assert time.perf_counter() - started < 5  # not the 30 s queue timeout
    assert sent[0]["status"] == 499 and admission.queue_depth == 0 and admission.inflight == 1
    [record] = app.state.waterfall.recent()
    assert (record.status_code, record.error) == (499, "client_disconnect")
    rejected = registry.get_sample_value("llmpath_admission_rejections_total", {"reason": "queue_timeout"})
    assert rejected == 0  # leaving is not a rejection
    admission.release()
    assert admission.inflight == 0  # the gone client's place did not take a slot
