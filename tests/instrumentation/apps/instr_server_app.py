"""An instrumented FastAPI app served by uvicorn/gunicorn in the instrumentation tests (configured by env vars).

LLMPATH_TEST_JSONL / LLMPATH_TEST_SQLITE: usage ledger paths; LLMPATH_TEST_SPANS: write finished spans as JSON
lines there (a file exporter, so a test can read another process's spans); LLMPATH_TEST_BACKEND: the base URL
that /call-backend calls.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from llmpath.instrumentation import (
    JsonlUsageSink,
    SqliteUsageSink,
    current_request,
    httpx_trace_hook,
    instrument_app,
    mark_first_token,
    model_call_span,
    record_stage,
    record_usage,
    set_request_labels,
    stage,
)


class JsonFileExporter(SpanExporter):
    """Appends each finished span as one JSON line (ids in hex)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with Path(self.path).open("a", encoding="utf-8") as fh:
            for s in spans:
                fh.write(
                    json.dumps(
                        {
                            "name": s.name,
                            "kind": s.kind.name,
                            "trace_id": format(s.context.trace_id, "032x"),
                            "span_id": format(s.context.span_id, "016x"),
                            "parent_id": format(s.parent.span_id, "016x") if s.parent else None,
                            "attributes": dict(s.attributes or {}),
                        }
                    )
                    + "\n"
                )
        return SpanExportResult.SUCCESS


sinks: list[Any] = []
if os.environ.get("LLMPATH_TEST_JSONL"):
    sinks.append(JsonlUsageSink(os.environ["LLMPATH_TEST_JSONL"]))
if os.environ.get("LLMPATH_TEST_SQLITE"):
    sinks.append(SqliteUsageSink(os.environ["LLMPATH_TEST_SQLITE"]))
provider = TracerProvider()
if os.environ.get("LLMPATH_TEST_SPANS"):
    provider.add_span_processor(SimpleSpanProcessor(JsonFileExporter(os.environ["LLMPATH_TEST_SPANS"])))
BACKEND = os.environ.get("LLMPATH_TEST_BACKEND", "")

app = FastAPI()


@app.post("/v1/chat/completions")
async def chat(body: dict[str, Any]) -> dict[str, Any]:
    with stage("auth"):
        await asyncio.sleep(0.001)
    with stage("route"):
        set_request_labels(route="chat", tenant=str(body.get("tenant", "acme")))
    with stage("schedule"):
        await asyncio.sleep(float(body.get("delay", 0.005)))
    record_stage("prefill", 0.001)
    mark_first_token()
    record_usage(input_tokens=50, cached_tokens=20, output_tokens=7, model="tiny")
    req = current_request()
    assert req is not None
    return {"request_id": req.request_id, "pid": os.getpid()}


@app.get("/v1/stream")
async def stream(tokens: int = 5, delay: float = 0.05) -> StreamingResponse:
    async def events() -> AsyncIterator[bytes]:
        with stage("schedule"):
            await asyncio.sleep(delay)
        for i in range(tokens):
            yield f'data: {{"token": {i}}}\n\n'.encode()
            await asyncio.sleep(delay)
        record_usage(input_tokens=10, cached_tokens=0, output_tokens=tokens, model="tiny")
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@app.get("/echo-headers")
async def echo_headers(request: Request) -> dict[str, Any]:
    """The "backend": what propagation headers reached it."""
    return {k: v for k, v in request.headers.items() if k in ("traceparent", "tracestate", "x-request-id")}


@app.get("/call-backend")
async def call_backend() -> dict[str, Any]:
    """The "gateway": calls BACKEND's /echo-headers inside the model-call span, with the httpx trace hook."""
    async with httpx.AsyncClient(event_hooks={"request": [httpx_trace_hook]}) as client:
        with model_call_span("tiny", server_address="127.0.0.1"):
            seen = (await client.get(f"{BACKEND}/echo-headers")).json()
    req = current_request()
    assert req is not None
    return {"seen": seen, "trace_id": req.trace_id, "request_id": req.request_id}


@app.get("/fail")
async def fail() -> None:
    raise RuntimeError("an exception no handler catches")


@app.get("/pid")
async def pid() -> dict[str, int]:
    return {"pid": os.getpid()}


instrument_app(app, tracer_provider=provider, usage_sink=sinks)
