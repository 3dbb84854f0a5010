"""Paths real FastAPI apps take: a stream that raises after its 200, background tasks and tasks that outlive the
request, sync endpoints and sync streamed bodies, overlapping stages."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI
from fastapi.responses import StreamingResponse
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.trace import StatusCode

import llmpath.instrumentation.api as api_module
from llmpath.instrumentation import (
    instrument_app,
    mark_first_token,
    model_call_span,
    record_stage,
    record_usage,
    stage,
)


async def test_a_stream_that_raises_after_its_200_counts_as_a_500(make_harness: Any) -> None:
    """The body generator raised after the status line and a first chunk: the client got a cut-off 200. Prometheus
    and the ledger count a 500 with the exception's class (an availability SLO must see it); the SERVER span keeps
    the 200 that was sent, with ``error.type`` and an error status."""
    app = FastAPI()
    h = make_harness(app=app)

    @app.get("/crash")
    async def crash() -> StreamingResponse:
        async def events() -> Any:
            yield b"data: 0\n\n"
            raise RuntimeError("backend said something private")

        return StreamingResponse(events(), media_type="text/event-stream")

    async with h.client() as c:
        with pytest.raises(RuntimeError):
            await c.get("/crash")
    [rec] = h.records
    assert (rec.status_code, rec.error) == (500, "RuntimeError")
    assert rec.ttft_s is not None  # its first chunk went out
    assert h.value("llmpath_requests_total", route="/crash", model="unknown", code="500") == 1
    assert h.value("llmpath_requests_total", route="/crash", model="unknown", code="200") == 0
    span = h.span("GET /crash")
    assert span.attributes["http.response.status_code"] == 200
    assert span.attributes["error.type"] == "RuntimeError"
    assert span.status.status_code is StatusCode.ERROR


async def test_a_background_task_that_raises_leaves_an_event_on_the_server_span(make_harness: Any) -> None:
    """A background task raises after the complete 200: the SERVER span gets an ``exception`` event with the class
    only (the message may quote a prompt); its status, the metrics and the record keep the 200 that was sent."""
    app = FastAPI()
    h = make_harness(app=app)

    def fail() -> None:
        raise RuntimeError("prompt text that must never be recorded")

    @app.get("/bg-fail")
    async def bg_fail(tasks: BackgroundTasks) -> dict[str, int]:
        tasks.add_task(fail)
        return {"ok": 1}

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        assert (await c.get("/bg-fail")).status_code == 200
    span = h.span("GET /bg-fail")
    assert [(e.name, dict(e.attributes or {})) for e in span.events] == [
        ("exception", {"exception.type": "RuntimeError"})
    ]
    assert span.status.status_code is not StatusCode.ERROR and "error.type" not in (span.attributes or {})
    [rec] = h.records
    assert (rec.status_code, rec.error) == (200, None)
    assert h.value("llmpath_requests_total", route="/bg-fail", model="unknown", code="200") == 1


async def test_stages_after_the_response_are_not_recorded(make_harness: Any, fast_spans: bool) -> None:
    """A FastAPI background task (run after the response, inside the same ASGI call) and a task that outlives the
    request call ``stage``/``record_stage``/``record_usage``/``mark_first_token``: nothing raises, the record
    written before the response's last message stays the only one, and no span, observation or leaked live span
    appears for work that is not part of the request; the next request is unaffected."""
    app = FastAPI()
    h = make_harness(app=app, fast_spans=fast_spans)
    later: list[asyncio.Task[None]] = []

    async def after() -> None:
        with stage("decode"):
            await asyncio.sleep(0.001)
        record_stage("prefill", 0.001)
        record_usage(input_tokens=5, cached_tokens=0, output_tokens=5, model="late")
        mark_first_token()

    async def outlive() -> None:
        await asyncio.sleep(0.01)
        await after()

    @app.get("/bg")
    async def bg(tasks: BackgroundTasks) -> dict[str, int]:
        with stage("auth"):
            pass
        tasks.add_task(after)
        later.append(asyncio.create_task(outlive()))
        return {"ok": 1}

    async with h.client() as c:
        assert (await c.get("/bg")).status_code == 200
        await asyncio.gather(*later)
        assert (await c.get("/bg")).status_code == 200
        await asyncio.gather(*later)
    assert len(h.records) == 2
    for rec in h.records:
        assert [s.name for s in rec.stages] == ["auth"] and rec.output_tokens == 0 and rec.model == "unknown"
    names = sorted(s.name for s in h.spans())
    assert names == ["GET /bg", "GET /bg", "llmpath.auth", "llmpath.auth"]
    assert h.value("llmpath_stage_duration_seconds_count", stage="decode", route="/bg") == 0
    assert h.value("llmpath_stage_duration_seconds_count", stage="prefill", route="/bg") == 0
    assert h.value("llmpath_stage_duration_seconds_count", stage="auth", route="/bg") == 2
    assert h.value("llmpath_requests_total", route="/bg", model="unknown", code="200") == 2


class _FailingOnEnd(SpanProcessor):
    """A span processor whose ``on_end`` raises for the spans of one stage."""

    def __init__(self, name: str) -> None:
        self.name = name

    def on_end(self, span: ReadableSpan) -> None:
        if span.name == self.name:
            raise RuntimeError("exporter bug")


def _late_stage_app(tasks: list[asyncio.Task[None]], release: asyncio.Event) -> FastAPI:
    """``GET /spawn`` starts a task whose ``decode`` stage lasts until ``release`` is set, and answers meanwhile."""
    app = FastAPI()
    started = asyncio.Event()

    async def slow() -> None:
        with stage("decode"):
            started.set()
            await release.wait()

    @app.get("/spawn")
    async def spawn() -> dict[str, int]:
        tasks.append(asyncio.create_task(slow()))
        await started.wait()
        return {"ok": 1}

    return app


async def test_a_stage_ending_after_its_request_still_ends_its_span(make_harness: Any, fast_spans: bool) -> None:
    """A task the request started runs a stage that ends after the response was sent and the request's spans were
    ended: the stage span is ended (exported) then, under the request's SERVER span; the stage is in no metric or
    record (they were written with the response)."""
    release = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    h = make_harness(app=_late_stage_app(tasks, release), fast_spans=fast_spans)

    async with h.client() as c:
        assert (await c.get("/spawn")).status_code == 200
        assert [s.name for s in h.spans()] == ["GET /spawn"]  # the stage still runs
        release.set()
        await asyncio.gather(*tasks)
    spans = {s.name: s for s in h.spans()}
    assert set(spans) == {"GET /spawn", "llmpath.decode"}
    server, decode = spans["GET /spawn"], spans["llmpath.decode"]
    assert decode.parent is not None and decode.parent.span_id == server.context.span_id
    assert decode.context.trace_id == server.context.trace_id
    assert decode.end_time is not None and server.end_time is not None and decode.end_time > server.end_time
    assert decode.attributes is not None and decode.attributes["llmpath.route.name"] == "/spawn"
    assert [s.name for s in h.records[0].stages] == []
    assert h.value("llmpath_stage_duration_seconds_count", stage="decode", route="/spawn") == 0


async def test_a_late_stage_span_that_fails_to_end_does_not_break_the_task(
    make_harness: Any, fast_spans: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Ending a late stage's span raises (a span processor's bug): the task's ``with stage(...)`` exits normally and
    the failure is logged, as at the request's end."""
    release = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    h = make_harness(app=_late_stage_app(tasks, release), fast_spans=fast_spans)
    h.provider.add_span_processor(_FailingOnEnd("llmpath.decode"))
    with caplog.at_level(logging.ERROR, logger="llmpath.instrumentation"):
        async with h.client() as c:
            assert (await c.get("/spawn")).status_code == 200
            release.set()
            await asyncio.gather(*tasks)  # raises if the task failed
    assert any("ending a stage span of request" in r.getMessage() for r in caplog.records)


async def test_sync_endpoint_and_sync_streamed_body(
    make_harness: Any, fast_spans: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``def`` endpoint (Starlette's thread pool, context copied) records its stage, first token and usage; a sync
    generator body (each item fetched in a fresh copy of the context) with ``with stage(...)`` across its yields is
    recorded once, with no "Failed to detach context" error logged for every request."""
    app = FastAPI()
    h = make_harness(app=app, fast_spans=fast_spans)

    @app.get("/sync")
    def sync() -> dict[str, int]:
        with stage("auth"):
            pass
        mark_first_token()
        record_usage(input_tokens=3, cached_tokens=1, output_tokens=2, model="m")
        return {"ok": 1}

    @app.get("/syncgen")
    def syncgen() -> StreamingResponse:
        def body() -> Any:
            with stage("decode"):
                yield b"a"
                yield b"b"
            with model_call_span("tiny", server_address="127.0.0.1", server_port=9000):
                yield b"c"
                yield b"d"

        return StreamingResponse(body())

    with caplog.at_level(logging.WARNING):
        async with h.client() as c:
            assert (await c.get("/sync")).status_code == 200
            assert (await c.get("/syncgen")).content == b"abcd"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    sync_rec, gen_rec = h.records
    assert [s.name for s in sync_rec.stages] == ["auth"] and sync_rec.ttft_s is not None
    assert (sync_rec.model, sync_rec.input_tokens, sync_rec.cached_tokens, sync_rec.output_tokens) == ("m", 3, 1, 2)
    assert sync_rec.tpot_s is not None
    assert [s.name for s in gen_rec.stages] == ["decode"]
    assert h.value("llmpath_requests_total", route="/sync", model="m", code="200") == 1
    assert h.value("llmpath_stage_duration_seconds_count", stage="decode", route="/syncgen") == 1
    server = h.span("GET /syncgen")
    decode = h.span("llmpath.decode")
    assert decode.parent is not None and decode.parent.span_id == server.context.span_id
    call = h.span("chat tiny")
    assert call.parent is not None and call.parent.span_id == server.context.span_id
    auth = h.span("llmpath.auth")
    assert auth.parent is not None and auth.parent.span_id == h.span("GET /sync").context.span_id


def _sync_dependency() -> Iterator[int]:
    with stage("auth"):  # around the yield: FastAPI runs the rest after the response was sent
        yield 1


async def _async_dependency() -> AsyncIterator[int]:
    async with stage("validate"):
        yield 1


async def test_a_stage_around_a_dependencys_yield_is_reported_not_silently_lost(
    make_harness: Any, fast_spans: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """FastAPI runs the exit code of a dependency with ``yield`` after the response was sent, when the record and the
    metrics are written: a stage around the ``yield`` cannot be counted. It must not corrupt anything, and the
    operator is told once per stage name (with how to fix it) instead of finding the stage missing from the
    metrics."""
    app = FastAPI()
    h = make_harness(app=app, fast_spans=fast_spans)
    getattr(api_module, "_LATE_STAGES", set()).clear()  # each name is reported once per process

    @app.get("/dep")
    async def dep(a: int = Depends(_sync_dependency), b: int = Depends(_async_dependency)) -> dict[str, int]:
        with stage("route"):
            pass
        return {"ok": a + b}

    with caplog.at_level(logging.WARNING, logger="llmpath.instrumentation"):
        async with h.client() as c:
            for _ in range(2):
                assert (await c.get("/dep")).status_code == 200
    late = [r.getMessage() for r in caplog.records if "after the response" in r.getMessage()]
    assert len(late) == 2 and any("stage auth " in m for m in late) and any("stage validate " in m for m in late)
    assert [[s.name for s in rec.stages] for rec in h.records] == [["route"], ["route"]]
    assert h.value("llmpath_stage_duration_seconds_count", stage="route", route="/dep") == 2
    assert h.value("llmpath_stage_duration_seconds_count", stage="auth", route="/dep") == 0
    assert h.value("llmpath_requests_total", route="/dep", model="unknown", code="200") == 2


async def test_overlapping_stages_of_gathered_tasks_tile_ttft_once(make_harness: Any) -> None:
    """Two stages run concurrently (``asyncio.gather``): each is recorded with its own duration and span under the
    SERVER span, and ``unattributed`` is TTFT minus their union (counted once), never negative."""
    app = FastAPI()
    h = make_harness(app=app)

    async def timed(name: str, seconds: float) -> None:
        with stage(name):
            await asyncio.sleep(seconds)

    @app.get("/both")
    async def both() -> dict[str, int]:
        await asyncio.gather(timed("schedule", 0.03), timed("cache_lookup", 0.015))
        mark_first_token()
        return {"ok": 1}

    async with h.client() as c:
        assert (await c.get("/both")).status_code == 200
    [rec] = h.records
    durations = {s.name: s.duration_s for s in rec.stages}
    assert durations["schedule"] >= 0.03 and durations["cache_lookup"] >= 0.015
    assert rec.ttft_s is not None and rec.unattributed_s is not None
    starts = [s.start_s for s in rec.stages]
    ends = [s.start_s + s.duration_s for s in rec.stages]
    assert max(starts) < min(ends)  # they overlap: their union is one interval
    union = min(max(ends), rec.ttft_s) - max(min(starts), 0.0)
    assert rec.unattributed_s == pytest.approx(rec.ttft_s - union, abs=1e-6)
    assert rec.unattributed_s > rec.ttft_s - sum(durations.values())  # not summed: the overlap counts once
    server = h.span("GET /both")
    for name in ("llmpath.schedule", "llmpath.cache_lookup"):
        span = h.span(name)
        assert span.parent is not None and span.parent.span_id == server.context.span_id


async def test_nested_and_repeated_instrumentation_record_each_request_once(make_harness: Any) -> None:
    """An instrumented app mounted under another, and ``instrument_app`` called twice on the outer app, all on one
    registry: one SERVER span, one usage record and one count per request, stages under the outer span."""
    inner = FastAPI()
    outer = FastAPI()

    @inner.get("/x")
    async def x() -> dict[str, int]:
        with stage("auth"):
            pass
        return {"ok": 1}

    h = make_harness(app=inner)
    outer.mount("/sub", inner)
    instrument_app(outer, registry=h.registry, tracer_provider=h.provider, usage_sink=h.records.append)
    instrument_app(outer, registry=h.registry, tracer_provider=h.provider, usage_sink=h.records.append)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=outer), base_url="http://gw") as c:
        r = await c.get("/sub/x")
    assert r.status_code == 200 and r.headers.get_list("x-request-id") == [h.records[0].request_id]
    assert len(h.records) == 1 and [s.name for s in h.records[0].stages] == ["auth"]
    assert sorted(s.name for s in h.spans()) == ["GET /sub/x", "llmpath.auth"]
    assert h.value("llmpath_requests_total", route="/sub/x", model="unknown", code="200") == 1


async def test_a_stream_whose_client_left_closes_its_stage_without_a_warning(
    make_harness: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The client left while the body generator was suspended in ``with stage("decode")`` at a ``yield``: the
    request is a 499, and the generator is closed later (GeneratorExit). That is not a misplaced stage: no warning."""
    app = FastAPI()
    h = make_harness(app=app)
    getattr(api_module, "_LATE_STAGES", set()).clear()

    @app.get("/s")
    async def s() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            with stage("decode"):
                for _ in range(5):
                    yield b"x"

        return StreamingResponse(body())

    chunks = 0

    async def send(message: Any) -> None:
        nonlocal chunks
        if message["type"] == "http.response.body":
            chunks += 1
            if chunks == 2:
                raise OSError("connection reset")

    async def receive() -> Any:
        await asyncio.sleep(10)

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": "/s", "raw_path": b"/s", "root_path": "", "query_string": b"", "headers": [],
        "server": ("gw", 80), "client": ("c", 1),
    }  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="llmpath.instrumentation"):
        with pytest.raises(Exception):  # noqa: B017  # Starlette's ClientDisconnect (or the OSError)
            await h.app(scope, receive, send)
        gc.collect()
        await asyncio.sleep(0.01)  # the event loop's asyncgen finalizer closes the generator
    assert [r.getMessage() for r in caplog.records] == []
    [rec] = h.records
    assert (rec.status_code, rec.error) == (499, "client_disconnect")
