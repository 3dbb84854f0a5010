"""Claims of docs/instrumentation.md and docs/multiprocess.md a gateway owner relies on that no other test checked:
the options of ``instrument_app``, the plain-ASGI route label, the timing helpers, generator stages, lifespan
shutdown in multiprocess mode, websocket passthrough, trace context without an SDK, ledger rotation, workers sharing
a ledger, the sinks' names, the tenant on the SERVER span, and the HTTP duration beside FastAPI's own telemetry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse
from opentelemetry import trace
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

from llmpath.instrumentation import (
    DEFAULT_EXCLUDED_PATHS,
    JsonlUsageSink,
    LLMPathMiddleware,
    RequestLogFilter,
    SqliteUsageSink,
    StageTiming,
    UsageRecord,
    catalog,
    current_request,
    get_instrumentation,
    inject_trace_headers,
    instrument_app,
    mark_first_token,
    model_call_span,
    read_jsonl,
    read_sqlite,
    record_stage,
    record_usage,
    set_request_labels,
    stage,
)
from llmpath.instrumentation.usage import UsageDispatcher
from tests.instrumentation.conftest import Harness, Meters


def record(request_id: str, **extra: Any) -> UsageRecord:
    return UsageRecord(
        request_id, None, 1_790_000_000.0, None, "chat", "m", 3, 1, 2,
        [StageTiming("auth", 0.0, 0.001)], None, 0.01, 200, extra=extra,
    )  # fmt: skip


async def test_options_metrics_path_prefix_exclusion_untrusted_ids_and_no_exemplars(
    make_harness: Callable[..., Harness],
) -> None:
    """``metrics_path=None`` leaves /metrics to the app, a trailing ``*`` excludes a prefix, ``trust_request_id=False``
    assigns an id whatever comes in, ``exemplars=False`` keeps trace ids off sampled requests' histograms."""
    app = FastAPI()

    @app.get("/metrics")
    async def own_metrics() -> dict[str, str]:
        return {"served_by": "the app"}

    @app.get("/internal/{name}")
    async def internal(name: str) -> dict[str, str]:
        return {"name": name}

    @app.get("/work")
    async def work() -> dict[str, bool]:
        with stage("auth"):
            pass
        return {"ok": True}

    h = make_harness(
        app=app, metrics_path=None, excluded_paths=["/internal/*"], trust_request_id=False, exemplars=False
    )
    async with h.client() as c:
        assert (await c.get("/metrics")).json() == {"served_by": "the app"}
        await c.get("/internal/a")
        r = await c.get("/work", headers={"x-request-id": "req-from-the-client"})
    assert r.headers["x-request-id"] != "req-from-the-client" and len(r.headers["x-request-id"]) == 32
    assert [rec.route for rec in h.records] == ["/metrics", "/work"]  # nothing for the excluded prefix
    assert h.records[1].request_id == r.headers["x-request-id"]
    assert h.spans() and "trace_id" not in openmetrics(h.registry).decode()  # sampled, yet no exemplars


async def test_default_excluded_paths_and_the_request_id_pattern(make_harness: Callable[..., Harness]) -> None:
    """The probes of the options table get no telemetry; an incoming id is kept only if it is 1-128 characters of
    ``[A-Za-z0-9._:@/+=-]``."""
    defaults = ("/health", "/healthz", "/livez", "/readyz", "/ready", "/favicon.ico", "/metrics")
    assert defaults == DEFAULT_EXCLUDED_PATHS
    h = make_harness()
    longest = "aZ09._:@/+=-" * 10 + "x" * 8  # 128 characters, every kind the pattern allows
    async with h.client() as c:
        for path in DEFAULT_EXCLUDED_PATHS:
            await c.get(path)
        assert h.records == []
        kept = await c.get("/items/1", headers={"x-request-id": longest})
        too_long = await c.get("/items/1", headers={"x-request-id": longest + "x"})
        bad_char = await c.get("/items/1", headers={"x-request-id": "req#1"})
    assert kept.headers["x-request-id"] == longest
    for r in (too_long, bad_char):
        assert len(r.headers["x-request-id"]) == 32 and r.headers["x-request-id"] != longest + "x"
    assert [rec.request_id for rec in h.records] == [r.headers["x-request-id"] for r in (kept, too_long, bad_char)]


async def test_plain_asgi_route_is_the_path_and_stages_outside_the_catalog_have_no_owner(
    make_harness: Callable[..., Harness],
) -> None:
    async def raw(scope: dict[str, Any], receive: Any, send: Any) -> None:
        with stage("custom_step"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    h = make_harness(app=FastAPI())  # for its tracer provider and registry
    records: list[UsageRecord] = []
    wrapped = instrument_app(raw, registry=h.registry, tracer_provider=h.provider, usage_sink=records.append)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=wrapped), base_url="http://gw") as c:
        await c.get("/v1/models/abc?key=secret")
    assert records[0].route == "/v1/models/abc"  # the raw path (no query string), not a template
    assert h.value("llmpath_stage_duration_seconds_count", stage="custom_step", route="/v1/models/abc") == 1
    span = h.span("llmpath.custom_step")
    assert span.attributes is not None and span.attributes["llmpath.stage.name"] == "custom_step"
    assert "llmpath.stage.owner" not in span.attributes
    assert h.span("llmpath.custom_step").parent is not None  # under the SERVER span
    server = next(s for s in h.spans() if s.kind is trace.SpanKind.SERVER)
    assert "secret" not in str(dict(server.attributes or {}))


async def test_timing_helpers_first_mark_wins_negative_stages_count_zero_and_tasks_see_the_request(
    make_harness: Callable[..., Harness],
) -> None:
    app = FastAPI()
    h = make_harness(app=app)
    seen: dict[str, Any] = {}

    @app.get("/timed")
    async def timed() -> dict[str, bool]:
        req = current_request()
        assert req is not None
        assert req.first_token_s is None
        await asyncio.sleep(0.01)
        mark_first_token()
        first = req.first_token_s
        await asyncio.sleep(0.01)
        mark_first_token()  # only the first call counts
        seen["first"], seen["again"], seen["elapsed"] = first, req.first_token_s, req.elapsed_s
        record_stage("schedule", -0.5)  # clock skew between processes: counts as 0

        async def in_a_task() -> bool:
            record_stage("assemble", 0.002, source="gateway")
            return current_request() is req

        seen["task"] = await asyncio.create_task(in_a_task())
        return {"ok": True}

    async with h.client() as c:
        await c.get("/timed")
    [rec] = h.records
    assert seen["task"] is True
    assert seen["first"] is not None and seen["first"] >= 0.009 and seen["again"] == seen["first"]
    assert seen["elapsed"] >= seen["first"] + 0.009
    assert rec.ttft_s == pytest.approx(seen["first"])
    assert {s.name: s.duration_s for s in rec.stages} == {"schedule": 0.0, "assemble": pytest.approx(0.002)}
    assert h.value("llmpath_stage_duration_seconds_sum", stage="schedule", route="/timed") == 0.0
    assert h.value("llmpath_stage_duration_seconds_count", stage="schedule", route="/timed") == 1


def test_lifespan_shutdown_closes_the_sinks_and_marks_the_worker_dead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn --workers has no child_exit hook: the worker's live* gauge files go on lifespan shutdown, the files
    of other workers and of other metric kinds stay."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    pid = os.getpid()
    names = [f"gauge_livesum_{pid}.db", f"gauge_livemin_{pid}.db", f"gauge_livesum_{pid + 1}.db", f"counter_{pid}.db"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    closed: list[bool] = []

    class Sink:
        def write(self, record: UsageRecord) -> None:
            pass

        def close(self) -> None:
            closed.append(True)

    async def raw(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})

    middleware = LLMPathMiddleware(raw, registry=CollectorRegistry(), usage_sink=Sink())
    assert middleware.instrumentation.exemplars is False  # none in multiprocess mode
    assert (tmp_path / names[0]).exists()  # nothing removed before shutdown
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    async def receive() -> dict[str, str]:
        return next(messages)

    async def send(message: MutableMapping[str, Any]) -> None:
        pass

    asyncio.run(middleware({"type": "lifespan"}, receive, send))
    assert closed == [True]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])


async def test_websocket_traffic_passes_through(make_harness: Callable[..., Harness]) -> None:
    app = FastAPI()

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(await websocket.receive_text())
        await websocket.close()

    h = make_harness(app=app)
    incoming = iter([{"type": "websocket.connect"}, {"type": "websocket.receive", "text": "ping"}])
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        return next(incoming)

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": "/ws", "raw_path": b"/ws", "root_path": "", "scheme": "ws",
             "query_string": b"", "headers": [], "subprotocols": [], "asgi": {"version": "3.0"}}  # fmt: skip
    await app(scope, receive, send)  # the ASGI conversation itself
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert sent[1]["text"] == "ping"
    assert h.records == [] and h.spans() == []
    assert not [s for f in h.registry.collect() if f.name == "llmpath_requests" for s in f.samples]


@pytest.fixture
def log_fields() -> Iterator[list[tuple[str, str, str]]]:
    fields: list[tuple[str, str, str]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            fields.append((record.request_id, record.trace_id, record.span_id))  # type: ignore[attr-defined]

    handler = Keep()
    handler.addFilter(RequestLogFilter())
    logger = logging.getLogger("gateway.doc_claims")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield fields
    logger.removeHandler(handler)


async def test_without_a_tracing_sdk_the_callers_trace_reaches_logs_and_headers_unchanged(
    log_fields: list[tuple[str, str, str]],
) -> None:
    """No SDK: the log lines carry the caller's trace id, and its span id when the caller sampled; the trace headers
    go downstream as they came in."""
    app = FastAPI()
    records: list[UsageRecord] = []
    instrument_app(
        app, registry=CollectorRegistry(), tracer_provider=trace.NoOpTracerProvider(), usage_sink=records.append
    )
    forwarded: list[dict[str, str]] = []

    @app.get("/down")
    async def down() -> dict[str, bool]:
        logging.getLogger("gateway.doc_claims").info("calling the backend")
        forwarded.append(dict(inject_trace_headers({})))
        return {"ok": True}

    trace_id, span_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        for flags in ("01", "00"):
            incoming = {"traceparent": f"00-{trace_id}-{span_id}-{flags}", "tracestate": "vendor=abc"}
            r = await c.get("/down", headers=incoming)
            assert forwarded[-1] == {**incoming, "x-request-id": r.headers["x-request-id"]}
        await c.get("/down")
    sampled, unsampled, untraced = log_fields
    assert sampled[1:] == (trace_id, span_id)
    assert unsampled[1:] == (trace_id, "-")
    assert untraced[1:] == ("-", "-") and "traceparent" not in forwarded[-1]
    assert [rec.trace_id for rec in records] == [trace_id, trace_id, None]
    assert [row[0] for row in log_fields] == [rec.request_id for rec in records]


def test_a_jsonl_ledger_follows_a_move_after_close_and_survives_copytruncate(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    sink = JsonlUsageSink(path)
    sink.write(record("r1"))
    path.rename(tmp_path / "usage.jsonl.1")  # logrotate's move
    sink.write(record("r2"))  # still the moved file until the sink is closed
    sink.close()
    sink.write(record("r3"))  # a new file at the path
    assert [r.request_id for r in read_jsonl(tmp_path / "usage.jsonl.1")] == ["r1", "r2"]
    assert [r.request_id for r in read_jsonl(path)] == ["r3"]
    os.truncate(path, 0)  # copytruncate: no close, and no hole before the next record
    sink.write(record("r4"))
    assert path.read_bytes().startswith(b'{"request_id":"r4"')
    assert [r.request_id for r in read_jsonl(path)] == ["r4"]
    sink.close()


WORKER = """
import sys, time
from llmpath.instrumentation import JsonlUsageSink, SqliteUsageSink, StageTiming, UsageRecord
jsonl, sqlite, name, start = JsonlUsageSink(sys.argv[1]), SqliteUsageSink(sys.argv[2]), sys.argv[3], float(sys.argv[4])
time.sleep(max(0.0, start - time.time()))  # all workers write at once
for i in range(150):
    record = UsageRecord(f"{name}-{i}", None, time.time(), "t", "chat", "m", 9, 1, 2,
                         [StageTiming("auth", 0.0, 0.001)], 0.02, 0.05, 200, extra={"pad": name * 2000})
    jsonl.write(record)
    sqlite.write(record)
"""


def test_worker_processes_share_one_jsonl_and_one_sqlite_ledger(tmp_path: Path) -> None:
    """What docs/multiprocess.md says of the sinks: one O_APPEND write per record keeps 2 KB lines of concurrent
    writers whole; SQLite's busy timeout serialises them."""
    jsonl, db = tmp_path / "usage.jsonl", tmp_path / "usage.db"
    start = time.time() + 2.0
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(jsonl), str(db), name, str(start)])
        for name in ("a", "b", "c")
    ]
    assert [w.wait(timeout=120) for w in workers] == [0, 0, 0]
    expected = sorted(f"{name}-{i}" for name in "abc" for i in range(150))
    from_jsonl = list(read_jsonl(jsonl))  # raises on a line two writers interleaved
    assert sorted(r.request_id for r in from_jsonl) == expected
    assert all(r.extra["pad"] == r.request_id[0] * 2000 for r in from_jsonl)
    assert sorted(r.request_id for r in read_sqlite(db)) == expected


def test_read_sqlite_opens_read_only(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    with pytest.raises(sqlite3.OperationalError):  # sqlite3's own error: the point is that nothing is created
        list(read_sqlite(missing))
    assert not missing.exists()


async def test_catalog_gauges_get_their_multiprocess_mode(harness: Harness) -> None:
    instr = get_instrumentation(harness.app)
    modes = {
        name: getattr(instr.metric(name), "_multiprocess_mode", None)
        for name in (catalog.BACKEND_UP, catalog.ADMISSION_INFLIGHT, catalog.ADMISSION_QUEUE_DEPTH)
    }
    assert modes == {
        catalog.BACKEND_UP: "livemin",
        catalog.ADMISSION_INFLIGHT: "livesum",
        catalog.ADMISSION_QUEUE_DEPTH: "livesum",
    }


def write_usage(record: UsageRecord) -> None:
    """A usage sink that is a plain function."""


def test_failure_counter_names_of_sqlite_and_function_sinks(tmp_path: Path) -> None:
    dispatcher = UsageDispatcher([SqliteUsageSink(tmp_path / "a.db"), write_usage, SqliteUsageSink(tmp_path / "b.db")])
    assert dispatcher.sink_names == ("sqlite", "write_usage", "sqlite_2")


@stage("assemble")
def documents(fail: bool) -> Iterator[str]:
    yield "doc0"
    if fail:
        raise ValueError("prompt text")
    yield "doc1"


async def test_a_generator_stage_that_raises_is_recorded_and_not_an_error(
    make_harness: Callable[..., Harness], fast_spans: bool
) -> None:
    app = FastAPI()
    h = make_harness(app=app, fast_spans=fast_spans)

    @app.get("/documents")
    async def read_docs() -> dict[str, list[str]]:
        got: list[str] = []
        with contextlib.suppress(ValueError):
            got.extend(documents(fail=True))
        return {"docs": got}

    async with h.client() as c:
        assert (await c.get("/documents")).json() == {"docs": ["doc0"]}
    assert [s.name for s in h.records[0].stages] == ["assemble"]
    span = h.span("llmpath.assemble")
    assert span.status.status_code is trace.StatusCode.UNSET and "error.type" not in (span.attributes or {})


async def test_the_server_span_carries_the_tenant_and_a_5xx_with_a_model_is_a_genai_error(
    meters: Meters, make_harness: Callable[..., Harness]
) -> None:
    """The tenant is on no histogram, but on the SERVER span (``llmpath.tenant``) and in the ledger; a 5xx answered
    without an exception has its status code as ``error.type`` on ``gen_ai.server.request.duration``."""
    app = FastAPI()
    h = make_harness(app=app, meter_provider=meters.provider)

    @app.get("/unavailable")
    async def unavailable() -> JSONResponse:
        set_request_labels(tenant="acme")
        with model_call_span("tiny"):
            pass
        record_usage(input_tokens=3, cached_tokens=0, output_tokens=0, model="tiny")
        return JSONResponse({"error": "no backend"}, status_code=503)

    async with h.client() as c:
        assert (await c.get("/unavailable")).status_code == 503
    server = h.span("GET /unavailable")
    assert server.attributes is not None and server.attributes["llmpath.tenant"] == "acme"
    assert h.records[0].tenant == "acme" and h.records[0].error is None
    [point] = meters.points()["gen_ai.server.request.duration"]
    assert point.attributes["error.type"] == "503"


def _http_duration_scopes(meters: Meters) -> list[str]:
    data = meters.reader.get_metrics_data()
    return sorted(
        sm.scope.name
        for rm in (data.resource_metrics if data else ())
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "http.server.request.duration"
    )


@pytest.mark.skipif(not hasattr(FastAPI(), "_native_telemetry"), reason="FastAPI without native telemetry")
@pytest.mark.parametrize("fastapi_traces", [True, False], ids=["fastapi-server-span", "metrics-only"])
async def test_http_server_duration_beside_fastapis_own_telemetry(
    meters: Meters, make_harness: Callable[..., Harness], fastapi_traces: bool
) -> None:
    """What docs/instrumentation.md says of FastAPI's own telemetry: llmpath records no HTTP duration where FastAPI
    made the SERVER span; where only metrics are configured, FastAPI and llmpath each record it, in their scopes."""
    h = make_harness(app=FastAPI())  # for its tracer provider and registry
    app = FastAPI(
        telemetry={
            "meter_provider": meters.provider,
            "tracer_provider": h.provider if fastapi_traces else None,
            "tracing": fastapi_traces,
            "logs": False,
        }
    )

    @app.get("/ok")
    async def ok() -> dict[str, bool]:
        return {"ok": True}

    instrument_app(app, registry=h.registry, tracer_provider=h.provider, meter_provider=meters.provider)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        assert (await c.get("/ok")).status_code == 200
    expected = ["fastapi"] if fastapi_traces else ["fastapi", "llmpath.instrumentation"]
    assert _http_duration_scopes(meters) == expected
