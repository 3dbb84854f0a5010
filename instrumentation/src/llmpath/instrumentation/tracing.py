"""Trace context: W3C ``traceparent`` into outgoing httpx requests, and the GenAI CLIENT span of a model call."""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping, Sequence
from time import perf_counter
from types import TracebackType
from typing import Any

from opentelemetry import context, propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind, Status, StatusCode

from llmpath.instrumentation.catalog import REQUEST_ID_HEADER
from llmpath.instrumentation.genai import (
    OPERATION,
    PROVIDER,
    REQUEST_MODEL,
    SERVER_ADDRESS,
    SERVER_PORT,
    GenAIMetrics,
)
from llmpath.instrumentation.request import CURRENT
from llmpath.instrumentation.spans import clean_attribute, detach
from llmpath.instrumentation.text import encodable

INSTRUMENTATION_NAME = "llmpath.instrumentation"


class AsgiHeaderGetter(Getter[Sequence[tuple[bytes, bytes]]]):
    """Reads propagation headers straight from an ASGI scope's ``headers`` list."""

    def get(self, carrier: Sequence[tuple[bytes, bytes]], key: str) -> list[str] | None:
        wanted = key.lower().encode("latin-1")
        values = [v.decode("latin-1") for k, v in carrier if k == wanted]
        return values or None

    def keys(self, carrier: Sequence[tuple[bytes, bytes]]) -> list[str]:
        return [k.decode("latin-1") for k, _ in carrier]


ASGI_GETTER = AsgiHeaderGetter()


def inject_trace_headers(headers: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """Add W3C ``traceparent``/``tracestate`` (the global propagator's fields) for the current span, and the
    current request's ``x-request-id`` unless present, to ``headers`` (a dict or ``httpx.Headers``); returns it.

    Inside :func:`model_call_span` the backend's spans become children of the model-call span.
    """
    propagate.inject(headers)
    req = CURRENT.get()
    if req is not None and not any(name.lower() == REQUEST_ID_HEADER for name in headers):
        headers[REQUEST_ID_HEADER] = req.request_id
    return headers


class _Done:
    """An already-finished awaitable, so one hook serves ``httpx.Client`` and ``httpx.AsyncClient``."""

    __slots__ = ()

    def __await__(self) -> Any:
        return iter(())


_DONE = _Done()


def httpx_trace_hook(request: Any) -> _Done:
    """An httpx ``request`` event hook that injects the trace headers; works for sync and async clients::

    httpx.AsyncClient(event_hooks={"request": [httpx_trace_hook]})
    """
    inject_trace_headers(request.headers)
    return _DONE


_global_genai: GenAIMetrics | None = None


def _fallback_genai() -> GenAIMetrics:
    global _global_genai
    if _global_genai is None:
        _global_genai = GenAIMetrics()
    return _global_genai


class ModelCallSpan:
    """The CLIENT span ``{operation} {model}`` of one model call, with GenAI v1.41 attributes.

    Use :func:`model_call_span`. Only counts, ids, finish reasons and timings are recorded: never prompt or
    completion text.
    """

    __slots__ = (
        "_attributes",
        "_error",
        "_genai",
        "_last_chunk",
        "_metric_attributes",
        "_metric_model",
        "_span",
        "_t0",
        "_token",
        "_ttfc",
        "_usage",
        "model",
        "operation",
        "provider",
    )

    def __init__(self, model: str, provider: str, operation: str, attributes: dict[str, Any]) -> None:
        self.model = model
        self.provider = provider
        self.operation = operation
        self._attributes = attributes
        self._span: trace.Span | None = None
        self._token: object | None = None
        self._t0 = 0.0
        self._ttfc: float | None = None
        #: When the latest chunk arrived (``perf_counter``), once the first has.
        self._last_chunk = 0.0
        self._usage: tuple[int, int] | None = None
        self._error: str | None = None
        self._genai: GenAIMetrics | None = None
        #: The model as the metrics name it: past the cardinality guard's cap, ``__other__``.
        self._metric_model = model
        self._metric_attributes: dict[str, Any] | None = None

    def __enter__(self) -> ModelCallSpan:
        req = CURRENT.get()
        if req is not None:
            if req.provider is None or req.provider_from_call:  # set_request_labels(provider=...) wins
                req.provider = self.provider
                req.provider_from_call = True
            if req.model is None:  # until record_usage or set_request_labels names it
                req.model = self.model
                req.model_from_call = True
            req.operation = self.operation
            tracer = req.instrumentation.tracer if req.sampled else None
            genai = req.instrumentation.genai
            self._metric_model = req.instrumentation.guard.admit("model", self.model)  # bounded like the labels
        else:
            tracer = trace.get_tracer(INSTRUMENTATION_NAME)
            genai = _fallback_genai()
        self._genai = genai if genai.enabled() else None
        if tracer is not None:
            span = tracer.start_span(
                f"{self.operation} {self.model}", kind=SpanKind.CLIENT, attributes=self._attributes
            )
            self._span = span
            self._token = context.attach(trace.set_span_in_context(span))
        self._t0 = perf_counter()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        duration = perf_counter() - self._t0
        error = self._error
        if exc_type is not None:
            error = exc_type.__qualname__
        span = self._span
        if span is not None:
            if error is not None:
                span.set_attribute("error.type", error)
                span.set_status(Status(StatusCode.ERROR, error))
            span.end()
            if self._token is not None:
                detach(self._token)
            self._span = self._token = None
        if self._genai is not None:
            usage = self._usage
            self._genai.record_client(
                self._client_metric_attributes(),
                duration=duration,
                time_to_first_chunk=self._ttfc,
                input_tokens=usage[0] if usage else None,
                output_tokens=usage[1] if usage else None,
                error_type=error,
            )

    def set_attribute(self, key: str, value: Any) -> None:
        """Set one span attribute (ignored when the trace is not sampled)."""
        if self._span is not None:
            self._span.set_attribute(key, clean_attribute(value))

    def set_usage(
        self,
        *,
        input_tokens: int,
        output_tokens: int,
        cached_tokens: int | None = None,
        cache_creation_tokens: int | None = None,
        reasoning_tokens: int | None = None,
    ) -> None:
        """Token counts of the call (``input_tokens`` includes cached ones, as in the semantic conventions)."""
        self._usage = (int(input_tokens), int(output_tokens))
        span = self._span
        if span is not None:
            span.set_attribute("gen_ai.usage.input_tokens", int(input_tokens))
            span.set_attribute("gen_ai.usage.output_tokens", int(output_tokens))
            if cached_tokens is not None:
                span.set_attribute("gen_ai.usage.cache_read.input_tokens", int(cached_tokens))
            if cache_creation_tokens is not None:
                span.set_attribute("gen_ai.usage.cache_creation.input_tokens", int(cache_creation_tokens))
            if reasoning_tokens is not None:
                span.set_attribute("gen_ai.usage.reasoning.output_tokens", int(reasoning_tokens))

    def set_finish_reasons(self, reasons: Iterable[str]) -> None:
        """``gen_ai.response.finish_reasons`` (e.g. ``["stop"]``, ``["length"]``)."""
        if self._span is not None:
            self._span.set_attribute("gen_ai.response.finish_reasons", [encodable(r) for r in reasons])

    def set_response(self, *, response_id: str | None = None, response_model: str | None = None) -> None:
        """``gen_ai.response.id`` and ``gen_ai.response.model``."""
        if self._span is not None:
            if response_id is not None:
                self._span.set_attribute("gen_ai.response.id", encodable(response_id))
            if response_model is not None:
                self._span.set_attribute("gen_ai.response.model", encodable(response_model))

    def mark_first_chunk(self) -> None:
        """The first chunk arrived: ``gen_ai.response.time_to_first_chunk`` and its client metric."""
        if self._ttfc is None:
            self._last_chunk = now = perf_counter()
            self._ttfc = now - self._t0
            if self._span is not None:
                self._span.set_attribute("gen_ai.response.time_to_first_chunk", self._ttfc)

    def mark_chunk(self) -> None:
        """A chunk of the streamed response arrived: the first is :meth:`mark_first_chunk`; each later one records
        ``gen_ai.client.operation.time_per_output_chunk`` (from the end of the previous chunk to this one's)."""
        if self._ttfc is None:
            self.mark_first_chunk()
            return
        now = perf_counter()
        if self._genai is not None:
            self._genai.client_tpoc.record(now - self._last_chunk, self._client_metric_attributes())
        self._last_chunk = now

    def _client_metric_attributes(self) -> dict[str, Any]:
        """The ``gen_ai.client.*`` metrics' attributes (made once per call)."""
        if self._metric_attributes is not None:
            return self._metric_attributes
        base = {OPERATION: self.operation, PROVIDER: self.provider, REQUEST_MODEL: self._metric_model}
        address = self._attributes.get(SERVER_ADDRESS)
        if address is not None:  # recommended on the client metrics: one series per backend
            base[SERVER_ADDRESS] = address
            if (port := self._attributes.get(SERVER_PORT)) is not None:
                base[SERVER_PORT] = port
        self._metric_attributes = base
        return base

    def set_error(self, error_type: str) -> None:
        """Mark the call failed without an exception (e.g. the backend answered 503): a low-cardinality type."""
        self._error = error_type


def model_call_span(
    model: str,
    *,
    provider: str = "sglang",
    server_address: str | None = None,
    server_port: int | None = None,
    stream: bool = True,
    operation: str = "chat",
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    attributes: dict[str, Any] | None = None,
) -> ModelCallSpan:
    """A context manager for the CLIENT span of a model call (``chat {model}``), current while it runs so that
    :func:`inject_trace_headers` makes the backend's spans its children. Sampling-relevant attributes are set at
    start; the handle has ``set_usage``, ``set_finish_reasons``, ``set_response``, ``mark_first_chunk`` and
    ``mark_chunk``. Also records ``gen_ai.client.operation.duration``, ``gen_ai.client.token.usage`` and, for a
    streamed call, ``…time_to_first_chunk`` and ``…time_per_output_chunk``.
    """
    model, provider = encodable(model), encodable(provider)
    attrs: dict[str, Any] = {OPERATION: operation, PROVIDER: provider, REQUEST_MODEL: model}
    if server_address is not None:
        attrs[SERVER_ADDRESS] = server_address
    if server_port is not None:
        attrs[SERVER_PORT] = int(server_port)
    if stream:
        attrs["gen_ai.request.stream"] = True
    if max_tokens is not None:
        attrs["gen_ai.request.max_tokens"] = int(max_tokens)
    if temperature is not None:
        attrs["gen_ai.request.temperature"] = float(temperature)
    if top_p is not None:
        attrs["gen_ai.request.top_p"] = float(top_p)
    if attributes:
        attrs.update((k, clean_attribute(v)) for k, v in attributes.items())
    return ModelCallSpan(model, provider, operation, attrs)
