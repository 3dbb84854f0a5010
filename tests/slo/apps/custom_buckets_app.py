"""An instrumented FastAPI app whose latency histograms have their own buckets (served by uvicorn in the live SLO
check tests): POST /v1/chat/completions records the chat route's stages, first token and token usage."""

from __future__ import annotations

from fastapi import FastAPI

from llmpath.instrumentation import (
    instrument_app,
    mark_first_token,
    record_stage,
    record_usage,
    set_request_labels,
    stage,
)

#: Not the catalog's LATENCY_BUCKETS: 0.35 is a bound here and not there, 0.5 the other way round.
BUCKETS = (0.05, 0.35, 0.7, 3.0)

app = instrument_app(FastAPI(), latency_buckets=BUCKETS)


@app.post("/v1/chat/completions")
async def chat() -> dict[str, list[str]]:
    with stage("auth"):
        set_request_labels(route="chat", model="tiny", tenant="acme")
    record_stage("prefill", 0.01)
    mark_first_token()
    record_usage(input_tokens=100, cached_tokens=60, output_tokens=3, model="tiny")
    return {"choices": []}
