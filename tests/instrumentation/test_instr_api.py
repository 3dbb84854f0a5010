"""The gateway-facing API: stage as decorator and context manager, no-ops outside requests, labels, annotations,
trace-header helpers, the cardinality guard and the multiprocess helpers."""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CollectorRegistry
from prometheus_client import values as prometheus_values

from llmpath.instrumentation import (
    STAGES,
    CardinalityGuard,
    JsonlUsageSink,
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
    read_jsonl,
    record_stage,
    record_usage,
    set_request_labels,
    stage,
)
from llmpath.instrumentation.multiprocess import mark_process_dead, prepare_multiprocess_dir
from tests.instrumentation.conftest import Meters


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
        assert req is not None
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
            seen["mixed case"] = inject_trace_headers({"X-Request-ID": "mine"})
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
    assert list(seen["mixed case"]) == ["X-Request-ID", "traceparent"]  # the caller's id is kept, not doubled
    assert call.attributes["gen_ai.provider.name"] == "openai"
    assert call.attributes["gen_ai.response.time_to_first_chunk"] >= 0


async def test_genai_metrics_through_a_configured_meter_provider(meters: Meters, make_harness):
    h = make_harness(meter_provider=meters.provider)
    async with h.client() as c:
        await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        await c.get("/items/1")  # no model: not a GenAI request
    points = meters.points()
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


def test_model_call_span_outside_a_request_uses_the_global_tracer():
    with model_call_span("m") as call:
        call.set_usage(input_tokens=1, output_tokens=1)
        call.set_response(response_id="x", response_model="m")
        call.set_error("backend_unavailable")


async def test_labels_from_the_model_call_yield_to_record_usage_and_set_request_labels(make_harness):
    app = FastAPI()
    h = make_harness(app=app)
    providers: dict[str, str | None] = {}

    @app.get("/call/{case}")
    async def call(case: str) -> dict[str, bool]:
        if case == "labels-first":
            set_request_labels(provider="vllm")
        with model_call_span("requested-model", server_port=8000) as span:
            span.set_usage(input_tokens=3, output_tokens=1)
        with model_call_span("requested-model", provider="openai", server_port=8000):
            pass  # a retry on another kind of backend
        if case == "labels-first":
            record_usage(input_tokens=3, cached_tokens=0, output_tokens=1, model="served-model")
        req = current_request()
        assert req is not None
        providers[case] = req.provider
        return {"ok": True}

    async with h.client() as c:
        await c.get("/call/labels-first")
        await c.get("/call/plain")
    served, requested = h.records
    assert served.model == "served-model"  # record_usage names the model the backend served
    assert requested.model == "requested-model"  # without it, the model call's model is the label
    assert h.value("llmpath_requests_total", route="/call/{case}", model="served-model", code="200") == 1
    spans = [s for s in h.exporter.get_finished_spans() if s.name == "chat requested-model"]
    assert providers == {"labels-first": "vllm", "plain": "openai"}  # the label set wins, else the latest call
    assert [s.attributes["server.port"] for s in spans] == [8000] * 4  # the port even without an address
    assert "server.address" not in spans[0].attributes


async def test_infinite_durations_are_ignored(make_harness, tmp_path):
    app = FastAPI()
    ledger = tmp_path / "usage.jsonl"
    h = make_harness(app=app, usage_sink=JsonlUsageSink(ledger))

    @app.get("/inf")
    async def inf() -> dict[str, bool]:
        record_stage("prefill", float("inf"))
        record_stage("decode", 0.01, end=float("-inf"))
        record_stage("schedule", 0.002)
        mark_first_token(at=float("nan"))
        return {"ok": True}

    async with h.client() as c:
        await c.get("/inf")
    [record] = read_jsonl(ledger)  # the ledger stays valid JSON
    assert [s.name for s in record.stages] == ["schedule"]
    assert h.value("llmpath_stage_duration_seconds_count", stage="prefill", route="/inf") == 0
    assert h.value("llmpath_stage_duration_seconds_sum", stage="schedule", route="/inf") == pytest.approx(0.002)
    assert record.ttft_s is not None and math.isfinite(record.ttft_s)  # the first body chunk, not NaN


async def test_one_stage_object_shared_by_concurrent_and_nested_runs(make_harness):
    app = FastAPI()
    h = make_harness(app=app)
    shared = stage("auth", kind="shared")
    a_inside, a_left = asyncio.Event(), asyncio.Event()

    @app.get("/shared/{name}")
    async def shared_run(name: str) -> dict[str, bool]:
        if name == "a":  # holds the object first, then leaves while /b is still inside its own run
            async with shared as run:
                run.set_attribute("holder", "a")
                a_inside.set()
                await asyncio.sleep(0.01)
            a_left.set()
        else:
            await a_inside.wait()
            async with shared:  # entered while /a holds it
                await a_left.wait()
                with shared:  # nested, after /a left
                    await asyncio.sleep(0.001)
                await asyncio.sleep(0.03)
        return {"ok": True}

    async with h.client() as c:
        await asyncio.gather(c.get("/shared/a"), c.get("/shared/b"))
    a, b = sorted(h.records, key=lambda r: len(r.stages))
    assert [s.name for s in a.stages] == ["auth"] and a.stages[0].duration_s > 0.009
    outer, inner = b.stages  # in start order
    assert outer.duration_s > 0.03  # /b's outer run lasted until its own end
    # the nested run ended itself, not the outer one
    assert outer.start_s < inner.start_s and inner.start_s + inner.duration_s < outer.start_s + outer.duration_s
    spans = [sp for sp in h.exporter.get_finished_spans() if sp.name == "llmpath.auth"]
    holders = sorted(sp.attributes.get("holder", "-") for sp in spans)
    assert holders == ["-", "-", "a"]  # /a's attribute stayed on /a's span
    assert all(sp.attributes["kind"] == "shared" for sp in spans)
    # /a's run ended when /a left (before /b's nested run began), not with /b's runs: by order, not by duration
    a_span = next(sp for sp in spans if sp.attributes.get("holder") == "a")
    b_outer, b_inner = sorted((sp for sp in spans if "holder" not in sp.attributes), key=lambda sp: sp.start_time)
    assert a_span.end_time <= b_inner.start_time < b_inner.end_time <= b_outer.end_time


@stage("decode")
async def stream_tokens(n: int) -> AsyncIterator[bytes]:
    for i in range(n):
        await asyncio.sleep(0.01)
        yield f"data: {i}\n\n".encode()


@stage("retrieve_docs")
def read_documents(n: int) -> Iterator[str]:
    for i in range(n):
        time.sleep(0.005)
        yield f"doc{i}"


async def test_a_custom_stage_in_the_gateway_overhead_group_counts_in_its_duration(make_harness):
    """Placed after validate and joined to gateway_overhead: its time is in the group's per-request duration (a
    stage outside every group is not), and the catalog lists it in the group in pipeline order."""
    app = FastAPI()
    moderation = Stage("moderation", "Content moderation.", "trust-safety")
    catalog = STAGES.with_stage(moderation, after="validate", groups=["gateway_overhead"]).with_stage(
        Stage("audit", "Audit logging.", "security")
    )
    h = make_harness(app=app, catalog=catalog)

    @app.get("/moderated")
    async def moderated() -> dict[str, bool]:
        async with stage("moderation"):
            await asyncio.sleep(0.03)
        async with stage("audit"):
            await asyncio.sleep(0.03)
        return {"ok": True}

    async with h.client() as c:
        assert (await c.get("/moderated")).status_code == 200
    overhead = catalog.group("gateway_overhead")
    assert overhead is not None
    assert overhead.stages == ("auth", "validate", "moderation", "route", "assemble", "cache_lookup")
    assert catalog.names.index("moderation") == catalog.names.index("validate") + 1
    group = {"group": "gateway_overhead", "route": "/moderated"}
    assert h.value("llmpath_stage_group_duration_seconds_count", **group) == 1
    moderation_s = h.value("llmpath_stage_duration_seconds_sum", stage="moderation", route="/moderated")
    assert moderation_s >= 0.03
    assert h.value("llmpath_stage_group_duration_seconds_sum", **group) == pytest.approx(moderation_s)  # not audit


async def test_stage_decorator_on_generators_times_the_iteration(make_harness, caplog):
    app = FastAPI()
    h = make_harness(app=app, catalog=STAGES.with_stage(Stage("retrieve_docs", "Read documents.", "application")))

    @app.get("/gen")
    async def gen() -> StreamingResponse:
        assert list(read_documents(3)) == ["doc0", "doc1", "doc2"]
        return StreamingResponse(stream_tokens(4), media_type="text/event-stream")

    @app.get("/sync-body")
    def sync_body() -> StreamingResponse:
        # Starlette iterates a sync body in a thread pool, each step in a copy of the context.
        return StreamingResponse(read_documents(3), media_type="text/plain")

    async with h.client() as c:
        r = await c.get("/gen")
        body = await c.get("/sync-body")
    assert r.text.count("data:") == 4 and body.text == "doc0doc1doc2"
    stages = {s.name: s.duration_s for s in h.records[0].stages}
    assert stages["retrieve_docs"] >= 0.015 and stages["decode"] >= 0.04
    assert [s.name for s in h.records[1].stages] == ["retrieve_docs"] and h.records[1].stages[0].duration_s >= 0.015
    assert h.span("llmpath.decode").status.is_ok
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # no context detached in another context


async def test_an_exception_handled_into_a_500_keeps_its_type_and_the_request_id(make_harness):
    app = FastAPI()

    @app.exception_handler(LookupError)  # handlers of specific exceptions run inside llmpath's middleware
    async def lookup_failed(request, exc: LookupError) -> JSONResponse:
        return JSONResponse({"error": {"type": "server_error"}}, status_code=500)

    @app.get("/lookup")
    async def lookup() -> None:
        raise KeyError("prompt text")

    @app.get("/unavailable")
    async def unavailable() -> None:
        raise HTTPException(503, "try later")  # the HTTP error itself: no exception class to report

    h = make_harness(app=app)
    async with h.client() as c:
        r = await c.get("/lookup")
        unavailable_status = (await c.get("/unavailable")).status_code
    assert r.status_code == 500 and r.headers["x-request-id"] == h.records[0].request_id
    assert h.records[0].error == "KeyError" and h.records[0].status_code == 500
    assert unavailable_status == 503 and h.records[1].error is None


async def _uncaught_500(h, path: str = "/fail") -> httpx.Response:
    transport = httpx.ASGITransport(app=h.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        return await c.get(path)


async def test_the_500_page_of_an_uncaught_exception_carries_the_request_id(make_harness):
    app = FastAPI()

    @app.get("/fail")
    async def fail() -> None:
        raise RuntimeError("prompt text")

    h = make_harness(app=app)
    r = await _uncaught_500(h)
    assert r.status_code == 500 and r.text == "Internal Server Error"  # Starlette's own page, unchanged
    assert r.headers["x-request-id"] == h.records[0].request_id
    assert h.records[0].error == "RuntimeError" and h.records[0].status_code == 500


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_the_apps_own_500_handler_keeps_its_page_and_gets_the_request_id(make_harness, kind):
    app = FastAPI()

    async def async_page(request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": {"type": "server_error", "handler": "async"}}, status_code=500)

    def sync_page(request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": {"type": "server_error", "handler": "sync"}}, status_code=500)

    app.add_exception_handler(Exception, async_page if kind == "async" else sync_page)

    @app.get("/fail")
    async def fail() -> None:
        raise RuntimeError("boom")

    h = make_harness(app=app)
    r = await _uncaught_500(h)
    assert r.status_code == 500 and r.json()["error"]["handler"] == kind
    assert r.headers["x-request-id"] == h.records[0].request_id


async def test_a_500_handler_that_sets_the_request_id_itself_is_left_alone(make_harness):
    app = FastAPI()

    @app.exception_handler(500)
    async def page(request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": "x"}, status_code=500, headers={"X-Request-ID": "set-by-the-app"})

    @app.get("/fail")
    async def fail() -> None:
        raise RuntimeError("boom")

    h = make_harness(app=app)
    r = await _uncaught_500(h)
    assert r.headers.get_list("x-request-id") == ["set-by-the-app"]
    assert h.records[0].status_code == 500


def test_cardinality_guard_caps_per_label():
    guard = CardinalityGuard({"route": 2, "*": 1})
    assert [guard.admit("route", v) for v in ("a", "b", "c", "a")] == ["a", "b", "__other__", "a"]
    assert guard.admit("tenant", "unknown") == "unknown" and guard.admit("route", "__unmatched__") == "__unmatched__"
    assert guard.admit("tenant", "acme") == "acme"  # the placeholders took no slot
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
    original_values = prometheus_values.ValueClass
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")  # recorded, so the variable is restored afterwards
    monkeypatch.setattr(prometheus_values, "ValueClass", prometheus_values.ValueClass)  # prepare switches it
    target = tmp_path / "mp"
    target.mkdir()
    (target / "counter_1.db").write_text("stale")
    (target / "notes.txt").write_text("not ours")
    assert prepare_multiprocess_dir(target) == target.resolve()
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(target.resolve())
    assert prometheus_values.ValueClass is not original_values  # metrics created from now on write files
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


async def test_an_incoming_request_id_with_a_trailing_newline_is_not_kept(make_harness):
    """Only the whole header value counts ("$" in a regex would accept a final newline)."""
    h = make_harness()
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    for value in (b"req-1\n", b"req-2"):
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
            "path": "/items/1", "raw_path": b"/items/1", "root_path": "", "query_string": b"",
            "headers": [(b"x-request-id", value)], "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 5),
        }  # fmt: skip
        await h.app(scope, receive, send)
    ids = [dict(m["headers"])[b"x-request-id"] for m in sent if m["type"] == "http.response.start"]
    assert ids[1] == b"req-2" and ids[0] != b"req-1\n" and len(ids[0]) == 32
