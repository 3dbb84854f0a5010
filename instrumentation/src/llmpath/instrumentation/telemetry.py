"""The instrumentation core: configuration, request start, and the once-per-request recording of spans,
Prometheus metrics, GenAI metrics and the usage record."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from operator import itemgetter
from random import getrandbits
from time import perf_counter, time, time_ns
from typing import Any

from opentelemetry import context, propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from llmpath.instrumentation.catalog import (
    ATTR_MODEL,
    ATTR_REQUEST_ID,
    ATTR_ROUTE,
    ATTR_STAGE,
    ATTR_STAGE_OWNER,
    ATTR_TENANT,
    ATTR_TIMING_SOURCE,
    LATENCY_BUCKETS,
    REQUEST_ID_HEADER,
    STAGE_SPAN_NAME,
    STAGES,
    TPOT_BUCKETS,
    UNATTRIBUTED,
    UNKNOWN_LABEL_VALUE,
    UNMATCHED_ROUTE,
    StageCatalog,
)
from llmpath.instrumentation.exposition import multiprocess_dir
from llmpath.instrumentation.genai import (
    ERROR_TYPE,
    OPERATION,
    PROVIDER,
    REQUEST_MODEL,
    SERVER_ADDRESS,
    SERVER_PORT,
    GenAIMetrics,
)
from llmpath.instrumentation.guard import DEFAULT_MAX_LABEL_VALUES, CardinalityGuard
from llmpath.instrumentation.metrics import metrics_for
from llmpath.instrumentation.request import CLIENT_CLOSED_REQUEST, RequestTelemetry, StageInterval
from llmpath.instrumentation.routes import RouteTemplates
from llmpath.instrumentation.spans import SdkSpanEmitter, SdkTracer, detach
from llmpath.instrumentation.tracing import ASGI_GETTER, INSTRUMENTATION_NAME
from llmpath.instrumentation.usage import (
    SinkLike,
    StageTiming,
    UsageDispatcher,
    UsageRecord,
    usage_line,
)

try:
    __version__ = version("llmpath-instrumentation")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without metadata
    __version__ = "0"

logger = logging.getLogger("llmpath.instrumentation")

#: Paths that get no spans, metrics or usage records by default: probes and scrapes, not LLM traffic (``/metrics``
#: matters when the app serves its own, ``metrics_path=None``).
DEFAULT_EXCLUDED_PATHS: tuple[str, ...] = (
    "/health",
    "/healthz",
    "/livez",
    "/readyz",
    "/ready",
    "/favicon.ico",
    "/metrics",
)
_REQUEST_ID_RE = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,128}")  # fullmatch: "$" would let a final newline in
_REQUEST_ID_KEY = REQUEST_ID_HEADER.encode()
_BY_START = itemgetter(1)
_NO_USAGE = (0, 0, 0)


class Instrumentation:
    """Everything one instrumented app shares: registry, tracer, meter, usage sinks and options.

    Created by :func:`~llmpath.instrumentation.instrument_app` (available as ``app.state.llmpath``) or
    :class:`~llmpath.instrumentation.LLMPathMiddleware`. The gateway creates its own catalog metrics on the same
    registry with :meth:`metric`.
    """

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: Any = None,
        usage_sink: SinkLike | Sequence[SinkLike] | None = None,
        metrics_path: str | None = "/metrics",
        catalog: StageCatalog = STAGES,
        excluded_paths: Iterable[str] = DEFAULT_EXCLUDED_PATHS,
        max_label_values: int | Mapping[str, int] = DEFAULT_MAX_LABEL_VALUES,
        latency_buckets: Sequence[float] = LATENCY_BUCKETS,
        tpot_buckets: Sequence[float] = TPOT_BUCKETS,
        exemplars: bool = True,
        trust_request_id: bool = True,
        fast_spans: bool = True,
    ) -> None:
        self.metrics = metrics_for(registry, latency_buckets=latency_buckets, tpot_buckets=tpot_buckets)
        self.metrics.join_groups(catalog.groups)
        self.registry: CollectorRegistry = self.metrics.registry
        self.tracer = trace.get_tracer(INSTRUMENTATION_NAME, __version__, tracer_provider=tracer_provider)
        self.genai = GenAIMetrics(meter_provider, __version__)
        self.guard = CardinalityGuard(max_label_values)
        failures = self.metrics.usage_failures
        self.usage = UsageDispatcher(usage_sink, on_failure=lambda sink: failures.labels(sink).inc())
        for sink in self.usage.sink_names:  # at 0 from the start, so that increase() sees the first failure
            failures.labels(sink)
        self.metrics_path = metrics_path
        self.catalog = catalog
        self.owners = {s.name: s.owner for s in catalog}
        self.owners[UNATTRIBUTED] = catalog.owner(UNATTRIBUTED)
        excluded = tuple(excluded_paths)
        self.excluded_exact = frozenset(p for p in excluded if not p.endswith("*"))
        self.excluded_prefixes = tuple(p[:-1] for p in excluded if p.endswith("*"))
        self.exemplars = exemplars and multiprocess_dir() is None  # prometheus-client has none in multiprocess mode
        self.trust_request_id = trust_request_id
        self.fast_spans = fast_spans
        #: opentelemetry-instrumentation-fastapi is on the app (it records ``http.server.*`` itself, even when no
        #: tracer SDK makes its SERVER span visible).
        self.outer_http_instrumentation = False
        #: Route templates with mount prefixes (its ``app``, the instrumented app, is set by the middleware).
        self.route_templates = RouteTemplates()
        self._emitter: SdkSpanEmitter | None = None
        self._emitter_key: object = None
        self._textmap: object = None
        self._trace_fields: frozenset[bytes] = frozenset()
        self._stage_spans: dict[str, tuple[str, dict[str, Any]]] = {}

    # ---- public helpers -------------------------------------------------------------------

    def metric(self, name: str, **kwargs: Any) -> MetricWrapperBase:
        """The catalog metric ``name`` on this instrumentation's registry, created on first use."""
        return self.metrics.metric(name, **kwargs)

    def is_excluded(self, path: str) -> bool:
        """True for paths that get no telemetry (``excluded_paths``; entries ending in ``*`` are prefixes)."""
        return path in self.excluded_exact or (bool(self.excluded_prefixes) and path.startswith(self.excluded_prefixes))

    def shutdown(self) -> None:
        """Close the usage sinks and, in multiprocess mode, mark this worker dead (for ``live*`` gauges)."""
        self.usage.close()
        if multiprocess_dir() is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())

    # ---- request lifecycle ----------------------------------------------------------------

    def _propagation_fields(self) -> frozenset[bytes]:
        textmap = propagate.get_global_textmap()
        if textmap is not self._textmap:
            self._trace_fields = frozenset(f.lower().encode("latin-1") for f in textmap.fields)
            self._textmap = textmap
        return self._trace_fields

    def start_request(self, scope: dict[str, Any]) -> tuple[RequestTelemetry, object | None]:
        """Begin a request: its id, its SERVER span (or the one an outer instrumentation made) and sampling.

        Returns the request and the context token to detach at the end (``None`` if nothing was attached).
        """
        start = perf_counter()
        start_ns = time_ns()
        headers = scope.get("headers") or ()
        fields = self._propagation_fields()
        request_id: str | None = None
        traced = False
        for key, value in headers:
            if key == _REQUEST_ID_KEY:
                if self.trust_request_id and _REQUEST_ID_RE.fullmatch(value):
                    request_id = value.decode("latin-1")
            elif key in fields:
                traced = True
        req = RequestTelemetry(self, request_id or getrandbits(128).to_bytes(16).hex(), start, start_ns)
        req.scope = scope
        req.method = method = scope.get("method", "GET")
        req.path = path = scope.get("path", "")
        method = _method_attribute(method)

        current_context = context.get_current()  # passed on explicitly: each lookup of the current one costs
        current = trace.get_current_span(current_context)
        span_context = current.get_span_context()
        token = None
        if span_context.is_valid and not span_context.is_remote and _is_server_span(current):
            span = current  # opentelemetry-instrumentation-fastapi (or another outer middleware) made it
            span.set_attribute(ATTR_REQUEST_ID, req.request_id)
        else:
            parent = propagate.extract(headers, getter=ASGI_GETTER) if traced else current_context
            span = self.tracer.start_span(
                _server_span_name(method, None),
                context=parent,
                kind=SpanKind.SERVER,
                attributes={
                    "http.request.method": method,
                    "url.path": path,
                    "url.scheme": scope.get("scheme", "http"),
                    ATTR_REQUEST_ID: req.request_id,
                },
                start_time=start_ns,
            )
            span_context = span.get_span_context()
            if not span_context.is_valid and traced:
                span = trace.get_current_span(parent)  # no SDK: pass the caller's trace context through
                span_context = span.get_span_context()
            else:
                req.owns_span = True
                if span.is_recording():
                    span.set_attributes(_connection_attributes(scope, headers, req.method))
            token = context.attach(trace.set_span_in_context(span, parent))
        req.span = span
        req.trace_id_int = span_context.trace_id if span_context.is_valid else 0  # 128 bits when valid
        if span.is_recording():  # sampled (a NonRecordingSpan otherwise)
            req.sampled = True
            req.emitter = emitter = self._span_emitter()
            if emitter is not None:
                req.pending_stages = []
            else:
                req.pending_spans = []
        return req, token

    def _span_emitter(self) -> SdkSpanEmitter | None:
        """The SDK fast path for stage spans, when our tracer is an OTel SDK tracer (see ``spans``)."""
        if not self.fast_spans or SdkTracer is None:
            return None
        tracer = self.tracer
        provider = None if isinstance(tracer, SdkTracer) else trace.get_tracer_provider()
        key = tracer if provider is None else provider
        if key is not self._emitter_key:
            if provider is not None:
                tracer = provider.get_tracer(INSTRUMENTATION_NAME, __version__)
            self._emitter = (
                SdkSpanEmitter(tracer, INSTRUMENTATION_NAME, __version__) if isinstance(tracer, SdkTracer) else None
            )
            self._emitter_key = key
        return self._emitter

    def default_route(self, req: RequestTelemetry) -> str:
        """The ``route`` label when the gateway set none: the matched route template, else the path."""
        scope = req.scope
        if scope is not None:
            template = self.route_templates.template(scope)
            if template:
                return template
            if "router" in scope or "litestar_app" in scope:  # Starlette's or Litestar's router matched nothing
                return UNMATCHED_ROUTE
        return req.path

    def start_stage_span(
        self, req: RequestTelemetry, name: str, t0: float, attributes: Mapping[str, Any] | None
    ) -> tuple[trace.Span, object]:
        """A live stage span (current while the stage runs, so spans made inside it nest under it)."""
        span = self._stage_span(req, name, t0, "gateway", attributes)
        return span, context.attach(trace.set_span_in_context(span))

    def record_stage_span(
        self,
        req: RequestTelemetry,
        name: str,
        t0: float,
        t1: float,
        source: str,
        attributes: Mapping[str, Any] | None,
    ) -> None:
        """A stage span for a stage measured elsewhere, placed at ``[t0, t1]``."""
        span = self._stage_span(req, name, t0, source, attributes)
        req.pending_spans.append((span, t1))  # type: ignore[union-attr]

    def _stage_span(
        self, req: RequestTelemetry, name: str, t0: float, source: str, attributes: Mapping[str, Any] | None
    ) -> trace.Span:
        span_name, common = self._stage_span_shape(name)
        attrs: dict[str, Any] = {**common, ATTR_TIMING_SOURCE: source}
        if attributes:
            attrs.update(attributes)
        return self.tracer.start_span(span_name, start_time=req.epoch_ns(t0), attributes=attrs)

    def finish(self, req: RequestTelemetry) -> None:
        """Record the finished request: Prometheus metrics, the usage record, then the OTel (GenAI, HTTP) metrics.

        Runs once, before the response's last message is sent, so that a completed response is always in the
        ledger. Never raises.
        """
        if req.finished:
            return
        req.finished = True
        end = req.end = perf_counter()
        try:
            self._record(req, end)
            if req.sampled:
                self._annotate_server_span(req)  # now: an outer instrumentation ends its span with the response
        except Exception:
            logger.exception("llmpath: recording request %s failed", req.request_id)

    def _record(self, req: RequestTelemetry, end: float) -> None:
        start = req.start
        duration = end - start
        ft = req.first_token
        stages = req.stages
        stages.sort(key=_BY_START)
        ttft = unattributed = None
        if ft is not None:
            ttft = ft - start
            unattributed = ttft - _covered(stages, start, ft)
            if unattributed < 0.0:
                unattributed = 0.0
        usage = req.usage
        tpot = None
        if usage is not None and ft is not None and usage[2] > 1:
            tpot = (end - ft) / (usage[2] - 1)
        route = req.route
        model = req.model or UNKNOWN_LABEL_VALUE
        code = req.status_code
        trace_id = req.trace_id if req.sampled and self.exemplars else None
        exemplar = None if trace_id is None else ({"trace_id": trace_id}, time())
        self.metrics.observe_request(
            self.guard, route, model, req.tenant, code, duration, ttft, tpot, stages, unattributed, usage, exemplar
        )
        if self.usage:
            self._emit_usage(req, route, model, stages, ttft, duration, code, unattributed, tpot)
        if self.genai.enabled():
            self._record_otel_metrics(req, model, duration, ttft, tpot)

    def _record_otel_metrics(
        self, req: RequestTelemetry, model: str, duration: float, ttft: float | None, tpot: float | None
    ) -> None:
        """The GenAI server metrics and ``http.server.request.duration`` of a finished request."""
        error = _error_type(req)
        if req.model is not None:
            self.genai.record_server(
                {
                    OPERATION: req.operation or "chat",
                    PROVIDER: req.provider or UNKNOWN_LABEL_VALUE,
                    REQUEST_MODEL: self.guard.admit("model", model),  # bounded as in the Prometheus labels
                },
                duration=duration,
                ttft=ttft,
                tpot=tpot,
                error_type=error,
            )
        if req.owns_span and not self.outer_http_instrumentation:  # else the outer instrumentation records it
            self.genai.record_http_server(_http_metric_attributes(req, error), duration)

    def _emit_usage(
        self,
        req: RequestTelemetry,
        route: str,
        model: str,
        stages: list[StageInterval],
        ttft: float | None,
        duration: float,
        code: int,
        unattributed: float | None,
        tpot: float | None,
    ) -> None:
        n_in, n_cached, n_out = req.usage or _NO_USAGE
        start = req.start
        head = (req.request_id, req.trace_id, req.start_ns / 1e9, req.tenant, route, model, n_in, n_cached, n_out)
        tail = (ttft, duration, code, unattributed, tpot, req.error)
        if not self.usage.needs_records:  # JSON-lines sinks only: serialise straight from the request
            self.usage.emit_line(usage_line(*head, stages, start, *tail, req.extra), req.request_id)
            return
        new = tuple.__new__  # StageTiming is a NamedTuple: build it without the Python-level constructor
        timeline = [new(StageTiming, (name, s - start, e - s, source)) for name, s, e, source in stages]
        self.usage.emit(UsageRecord(*head, timeline, *tail, req.extra or {}))

    def note_failure_after_response(self, req: RequestTelemetry, exc: Exception) -> None:
        """An exception escaped the app after the response was complete (a background task): the SERVER span gets
        an ``exception`` event with its class (no message: it may quote a prompt); its status, the metrics and the
        record keep the response that was sent. An outer instrumentation that made the span records it itself."""
        span = req.span
        if req.owns_span and span is not None and span.is_recording():
            try:
                span.add_event("exception", {"exception.type": type(exc).__qualname__})
            except Exception:
                logger.exception("llmpath: recording a failure after request %s failed", req.request_id)

    def close(self, req: RequestTelemetry, token: object | None) -> None:
        """End the request's spans (after the response is sent) and restore the context."""
        try:
            if req.sampled:
                self._end_spans(req)
        except Exception:
            logger.exception("llmpath: ending the spans of request %s failed", req.request_id)
        finally:
            if token is not None:
                detach(token)

    def _end_spans(self, req: RequestTelemetry) -> None:
        self.end_stage_spans(req)
        req.spans_ended = True
        if req.owns_span and req.span is not None:
            req.span.end()  # now: the server span covers sending the last message

    def end_stage_spans(self, req: RequestTelemetry) -> None:
        """End (or, on the SDK fast path, emit) the finished stage spans a sampled request holds, and forget them:
        at the request's end, and at once for a stage that ends after it (a task that outlived the request)."""
        route = req.route
        pending_stages, emitter = req.pending_stages, req.emitter
        if pending_stages and emitter is not None:  # the SDK fast path's
            epoch_ns = req.epoch_ns
            for name, ctx, parent, attributes, t0, t1, error in pending_stages:
                span_name, common = self._stage_span_shape(name)
                attrs = {**common, ATTR_ROUTE: route}
                if attributes:
                    attrs.update(attributes)
                if error is not None:
                    attrs["error.type"] = error
                emitter.emit(span_name, ctx, parent, attrs, epoch_ns(t0), epoch_ns(t1), error)
            pending_stages.clear()
        pending_spans = req.pending_spans
        if pending_spans:
            for span, t1 in pending_spans:
                span.set_attribute(ATTR_ROUTE, route)
                span.end(end_time=req.epoch_ns(t1))
            pending_spans.clear()

    def _stage_span_shape(self, name: str) -> tuple[str, dict[str, Any]]:
        """A stage span's name and the attributes every span of that stage has (cached per stage name; the timing
        source is ``gateway`` unless the caller overrides it)."""
        shape = self._stage_spans.get(name)
        if shape is not None:
            return shape
        attrs = {ATTR_STAGE: name, ATTR_TIMING_SOURCE: "gateway"}
        owner = self.owners.get(name)
        if owner is not None:
            attrs[ATTR_STAGE_OWNER] = owner
        shape = (STAGE_SPAN_NAME.format(stage=name), attrs)
        if len(self._stage_spans) < 256:  # stage names are validated and few; bound it anyway
            self._stage_spans[name] = shape
        return shape

    def _annotate_server_span(self, req: RequestTelemetry) -> None:
        span = req.span
        if span is None:
            return
        code = req.status_code
        attrs: dict[str, Any] = {ATTR_ROUTE: req.route}
        sent = _sent_status(req)
        if sent is not None:
            attrs["http.response.status_code"] = sent
        if req.model is not None:
            attrs[ATTR_MODEL] = req.model
        if req.tenant is not None:
            attrs[ATTR_TENANT] = req.tenant
        template = _route_template(req)
        if template:
            attrs["http.route"] = template
        error = _error_type(req)
        if error is not None:
            attrs[ERROR_TYPE] = error
        span.set_attributes(attrs)
        if code >= 500:
            span.set_status(Status(StatusCode.ERROR, req.error))  # the status code alone says the rest
        if req.owns_span:
            span.update_name(_server_span_name(_method_attribute(req.method), template))


#: HTTP methods the semantic conventions know (RFC 9110 and PATCH); others are recorded as ``_OTHER``.
KNOWN_HTTP_METHODS = frozenset({"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"})
OTHER_HTTP_METHOD = "_OTHER"


def _method_attribute(method: str) -> str:
    """``http.request.method``: ``_OTHER`` for a method the conventions do not know (a client cannot mint values)."""
    return method if method in KNOWN_HTTP_METHODS else OTHER_HTTP_METHOD


def _server_span_name(method: str, template: str | None) -> str:
    """``{method} {route}``, or ``HTTP {route}`` for ``_OTHER`` (``method`` is the attribute's value)."""
    name = "HTTP" if method == OTHER_HTTP_METHOD else method
    return f"{name} {template}" if template else name


def _error_type(req: RequestTelemetry) -> str | None:
    """``error.type``: the request's error, else the status code of a 5xx (the HTTP conventions' rule)."""
    if req.error is not None:
        return req.error
    return str(req.status_code) if req.status_code >= 500 else None


def _route_template(req: RequestTelemetry) -> str | None:
    scope = req.scope
    return None if scope is None else req.instrumentation.route_templates.template(scope)


def _sent_status(req: RequestTelemetry) -> int | None:
    """The response's status for the spans and OTel metrics. A client that left (499) and a response that failed
    after it started (:func:`fail_request`) have their status only in the Prometheus ``code`` label and the usage
    record: here it is the status that was sent, or none if the response had not started."""
    sent = req.response_status
    if req.status_code != CLIENT_CLOSED_REQUEST and (sent is None or sent == req.status_code):
        return req.status_code
    # The client left (499), or the response failed after it started (fail_request): the status it was sent.
    return None if sent is None or sent == CLIENT_CLOSED_REQUEST else sent


def _connection_attributes(
    scope: Mapping[str, Any], headers: Iterable[tuple[bytes, bytes]], method: str
) -> dict[str, Any]:
    """The SERVER span's recommended connection attributes (sampled requests only; no client address: privacy)."""
    attrs: dict[str, Any] = {}
    if _method_attribute(method) == OTHER_HTTP_METHOD:
        attrs["http.request.method_original"] = method
    version = scope.get("http_version")
    if version:
        attrs["network.protocol.version"] = version
    host = None
    for key, value in headers:
        if key == b"host":
            host = value.decode("latin-1")
        elif key == b"user-agent":
            attrs["user_agent.original"] = value.decode("latin-1")
    server = scope.get("server")
    if host:
        name, _, port = host.rpartition(":") if host.rfind(":") > host.rfind("]") else (host, "", "")
        attrs[SERVER_ADDRESS] = name.strip("[]")
        if port.isdigit():
            attrs[SERVER_PORT] = int(port)
    elif server:
        attrs[SERVER_ADDRESS], attrs[SERVER_PORT] = server[0], server[1]
    return attrs


def _http_metric_attributes(req: RequestTelemetry, error: str | None) -> dict[str, Any]:
    """``http.server.request.duration``'s attributes (the semantic conventions' required and recommended ones)."""
    attrs: dict[str, Any] = {
        "http.request.method": _method_attribute(req.method),
        "url.scheme": (req.scope or {}).get("scheme", "http"),
    }
    template = _route_template(req)
    if template:
        attrs["http.route"] = template
    sent = _sent_status(req)
    if sent is not None:
        attrs["http.response.status_code"] = sent
    if error is not None:
        attrs[ERROR_TYPE] = error
    return attrs


def _is_server_span(span: trace.Span) -> bool:
    """An outer instrumentation's server span (SDK spans expose ``kind``; an unsampled one is non-recording)."""
    kind = getattr(span, "kind", None)
    return kind is SpanKind.SERVER or (kind is None and not span.is_recording())


def _covered(stages: Sequence[StageInterval], lo: float, hi: float) -> float:
    """The length of the union of the intervals clipped to ``[lo, hi]``. ``stages`` must be sorted by start."""
    covered = 0.0
    cur_s = cur_e = lo
    for _, s, e, _ in stages:
        if s < lo:
            s = lo
        if e > hi:
            e = hi
        if e <= s:
            continue
        if s > cur_e:
            covered += cur_e - cur_s
            cur_s, cur_e = s, e
        elif e > cur_e:
            cur_e = e
    return covered + (cur_e - cur_s)
