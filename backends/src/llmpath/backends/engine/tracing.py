"""OpenTelemetry tracing of engine requests, under the caller's W3C ``traceparent``.

Spans are built when a request finishes, from the times the scheduler recorded: a root span
``Req <rid[:8]>`` (SGLang's name and ``gen_ai.*`` attributes) with the stage children ``prefill_waiting``
(queue), ``prefill_forward`` and ``decode_loop``. Nothing is exported unless an OTLP endpoint is configured with
``--otlp-traces-endpoint`` or the standard ``OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`` variables.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()
_PROVIDERS: list[Any] = []


def extract_context(headers: Mapping[str, str]) -> Context | None:
    """The parent context from ``traceparent``/``tracestate`` headers, or ``None`` when absent or invalid."""
    carrier = {k.lower(): v for k, v in headers.items() if k.lower() in ("traceparent", "tracestate")}
    if "traceparent" not in carrier:
        return None
    ctx = _PROPAGATOR.extract(carrier)
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def otlp_traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of ``--otlp-traces-endpoint``: SGLang's ``host:port`` gets ``http://``, and a URL
    without the ``/v1/traces`` path gets it."""
    url = endpoint if endpoint.startswith(("http://", "https://")) else f"http://{endpoint}"
    return url if url.rstrip("/").endswith("/v1/traces") else url.rstrip("/") + "/v1/traces"


def setup_tracer(service_name: str, endpoint: str | None) -> Tracer | None:
    """A tracer exporting OTLP/HTTP spans when an endpoint is configured, else ``None`` (tracing off).

    Uses a private provider so that an embedding process's global provider is left alone.
    """
    env_endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint and not env_endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporter = OTLPSpanExporter(endpoint=otlp_traces_url(endpoint)) if endpoint else OTLPSpanExporter()
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _PROVIDERS.append(provider)
    return provider.get_tracer("llmpath.backends.engine")


def shutdown_tracing() -> None:
    """Flush and stop every provider :func:`setup_tracer` created."""
    while _PROVIDERS:
        _PROVIDERS.pop().shutdown()


@dataclass(slots=True)
class RequestTrace:
    """What the scheduler recorded about a finished request (epoch nanoseconds)."""

    rid: str
    parent: Context | None
    received_ns: int
    forward_entry_ns: int | None
    prefill_finished_ns: int | None
    finished_ns: int
    attributes: dict[str, Any]


def emit_request_spans(tracer: Tracer, rec: RequestTrace) -> None:
    """Create the request's span tree with the recorded times."""
    root = tracer.start_span(
        f"Req {rec.rid[:8]}",
        context=rec.parent,
        kind=SpanKind.SERVER,
        start_time=rec.received_ns,
        attributes={"rid": rec.rid, "module": "sglang::request", **rec.attributes},
    )
    ctx = trace.set_span_in_context(root)
    stages = [("prefill_waiting", rec.received_ns, rec.forward_entry_ns or rec.finished_ns)]
    if rec.forward_entry_ns is not None:
        stages.append(("prefill_forward", rec.forward_entry_ns, rec.prefill_finished_ns or rec.finished_ns))
    if rec.prefill_finished_ns is not None:
        stages.append(("decode_loop", rec.prefill_finished_ns, rec.finished_ns))
    for name, start, end in stages:
        tracer.start_span(name, context=ctx, start_time=start).end(end_time=end)
    root.end(end_time=rec.finished_ns)


def finish_attributes(
    *, rid: str, model: str, prompt: int, completion: int, cached: int, finish_reason: str, params: dict[str, Any],
    ttft: float | None, e2e: float, prefill: float | None, decode: float | None,
) -> dict[str, Any]:  # fmt: skip
    """SGLang's root-span attributes at finish (sglang.md §6)."""
    attrs: dict[str, Any] = {
        "gen_ai.usage.prompt_tokens": prompt,
        "gen_ai.usage.completion_tokens": completion,
        "gen_ai.usage.cached_tokens": cached,
        "gen_ai.request.id": rid,
        "gen_ai.response.model": model,
        "gen_ai.response.finish_reasons": json.dumps([finish_reason]),
        "gen_ai.latency.e2e": e2e,
        **{f"gen_ai.request.{k}": v for k, v in params.items() if v is not None},
    }
    if ttft is not None:
        attrs["gen_ai.latency.time_to_first_token"] = ttft
    if prefill is not None:
        attrs["gen_ai.latency.time_in_model_prefill"] = prefill
    if decode is not None:
        attrs["gen_ai.latency.time_in_model_decode"] = decode
        attrs["gen_ai.latency.time_in_model_inference"] = (prefill or 0.0) + decode
    return attrs
