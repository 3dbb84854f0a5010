"""Paths real FastAPI apps take: a stream that raises after its 200, background tasks and tasks that outlive the
request, sync endpoints and sync streamed bodies, overlapping stages."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from fastapi import BackgroundTasks, FastAPI
from fastapi.responses import StreamingResponse
from opentelemetry.trace import StatusCode

from llmpath.instrumentation import mark_first_token, record_stage, record_usage, stage


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
