"""Fixtures for the instrumentation tests: an SDK tracer provider with an in-memory exporter, a fresh registry,
and a FastAPI app exercising the whole public API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Sampler
from prometheus_client import CollectorRegistry

from llmpath.instrumentation import (
    UsageRecord,
    annotate_request,
    instrument_app,
    mark_first_token,
    model_call_span,
    record_stage,
    record_usage,
    set_request_labels,
    stage,
)

STAGE_SLEEP = 0.004


@dataclass
class Meters:
    """An SDK MeterProvider reading into memory (``meters`` fixture): pass ``provider`` to the app under test."""

    reader: InMemoryMetricReader
    provider: MeterProvider

    def points(self) -> dict[str, list[Any]]:
        """OTel metric name → its data points now."""
        return metric_points(self.reader)


@pytest.fixture
def meters() -> Iterator[Meters]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    yield Meters(reader, provider)
    provider.shutdown()


def metric_points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    """OTel metric name → its data points (all scopes), as an in-memory reader has them now."""
    out: dict[str, list[Any]] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                out.setdefault(m.name, []).extend(m.data.data_points)
    return out


@dataclass
class Harness:
    """An instrumented FastAPI app with its exporter, registry and captured usage records."""

    app: FastAPI
    exporter: InMemorySpanExporter
    provider: TracerProvider
    registry: CollectorRegistry
    records: list[UsageRecord] = field(default_factory=list)

    def spans(self) -> list[ReadableSpan]:
        self.provider.force_flush()
        return list(self.exporter.get_finished_spans())

    def span(self, name: str) -> ReadableSpan:
        found = [s for s in self.spans() if s.name == name]
        assert len(found) == 1, f"expected one span {name!r}, got {[s.name for s in self.spans()]}"
        return found[0]

    def value(self, name: str, **labels: str) -> float:
        v = self.registry.get_sample_value(name, labels)
        return 0.0 if v is None else v

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://gw", **kwargs)


def tracer_provider(sampler: Sampler = ALWAYS_ON) -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def build_app() -> FastAPI:
    """Routes covering the public API (the stage calls mimic a gateway)."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(body: dict[str, Any]) -> dict[str, Any]:
        with stage("auth"):
            await asyncio.sleep(STAGE_SLEEP)
        with stage("validate"):
            pass
        with stage("route") as s:
            s.set_attribute("llmpath.backend", "engine-a")
            set_request_labels(route="chat", tenant="acme")
        async with stage("assemble", documents=2):
            await asyncio.sleep(STAGE_SLEEP)
        with stage("cache_lookup"):
            pass
        with stage("schedule"):
            await asyncio.sleep(STAGE_SLEEP)
        with model_call_span("tiny-llama", server_address="127.0.0.1", server_port=9000, stream=False) as call:
            await asyncio.sleep(STAGE_SLEEP)
            record_stage("prefill", STAGE_SLEEP)
            mark_first_token()
            await asyncio.sleep(STAGE_SLEEP)
            record_stage("decode", STAGE_SLEEP)
            call.set_usage(input_tokens=120, output_tokens=5, cached_tokens=96)
            call.set_finish_reasons(["stop"])
        record_usage(input_tokens=120, cached_tokens=96, output_tokens=5, model="tiny-llama", tenant="acme")
        annotate_request(backend="engine-a", matched_prefix_tokens=96)
        return {"content": body.get("messages", [{}])[-1].get("content", "")[::-1]}

    @app.post("/v1/stream")
    async def stream(body: dict[str, Any]) -> StreamingResponse:
        delay = float(body.get("delay", 0.02))
        tokens = int(body.get("tokens", 5))

        async def events() -> AsyncIterator[bytes]:
            with stage("schedule"):
                await asyncio.sleep(delay)
            for i in range(tokens):
                yield f"data: {i}\n\n".encode()
                await asyncio.sleep(delay)
            record_usage(input_tokens=10, cached_tokens=0, output_tokens=tokens, model="tiny-llama")

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item": item_id}

    @app.get("/boom")
    async def boom() -> None:
        with stage("route"):
            raise RuntimeError("prompt text that must never be recorded")

    @app.get("/teapot")
    async def teapot() -> None:
        raise HTTPException(status_code=418, detail="no")

    @app.get("/labelled/{name}")
    async def labelled(name: str) -> dict[str, str]:
        set_request_labels(route=name, model=f"model-{name}", tenant=f"tenant-{name}")
        record_usage(input_tokens=3, cached_tokens=1, output_tokens=2, model=f"model-{name}")
        with stage("auth"):
            pass
        return {"name": name}

    @app.get("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    return app


@pytest.fixture(params=[True, False], ids=["fast-spans", "api-spans"])
def fast_spans(request: pytest.FixtureRequest) -> bool:
    """Run span tests with both stage-span paths: the SDK fast path and ordinary OTel API spans."""
    return bool(request.param)


@pytest.fixture
def make_harness() -> Iterator[Callable[..., Harness]]:
    """``make_harness(sampler=..., **instrument_app options)`` → a :class:`Harness`."""
    providers: list[TracerProvider] = []

    def make(sampler: Sampler = ALWAYS_ON, app: FastAPI | None = None, **options: Any) -> Harness:
        provider, exporter = tracer_provider(sampler)
        providers.append(provider)
        registry = CollectorRegistry()
        records: list[UsageRecord] = []
        options.setdefault("usage_sink", records.append)
        target = app if app is not None else build_app()
        instrument_app(target, registry=registry, tracer_provider=provider, **options)
        return Harness(target, exporter, provider, registry, records)

    yield make
    for provider in providers:
        provider.shutdown()


@pytest.fixture
def harness(make_harness: Callable[..., Harness]) -> Harness:
    return make_harness()
