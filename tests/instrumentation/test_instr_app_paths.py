"""Paths real FastAPI apps take: a stream that raises after its 200, background tasks and tasks that outlive the
request, sync endpoints and sync streamed bodies, overlapping stages."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
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
