"""The functions a gateway calls while serving a request: stages, first token, usage, labels, annotations.

All of them act on the current request (a context variable set by the middleware) and are cheap no-ops outside
one, so library code can call them unconditionally.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Callable, Mapping
from time import perf_counter
from types import TracebackType
from typing import Any, TypeVar

from opentelemetry import context, trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, Status, StatusCode

from llmpath.instrumentation.catalog import ATTR_TIMING_SOURCE, TIMING_SOURCES, validate_stage_name
from llmpath.instrumentation.request import CURRENT, RequestTelemetry
from llmpath.instrumentation.spans import clean_attribute, current_span_context, detach
from llmpath.instrumentation.text import encodable

logger = logging.getLogger("llmpath.instrumentation")

F = TypeVar("F", bound=Callable[..., Any])
_VALID_NAMES: set[str] = set()


def _check_name(name: str) -> str:
    if name not in _VALID_NAMES:
        validate_stage_name(name)
        _VALID_NAMES.add(name)
    return name


class StageScope:
    """``stage(name, **attributes)``: time a stage of the current request: one child span of the request (when
    sampled) and one observation in ``llmpath_stage_duration_seconds{stage,route}``. An exception marks the span as
    error and propagates.

    Works as ``with stage("route") as s: s.set_attribute("llmpath.route.backend", b)``, ``async with``, and as a
    decorator ``@stage("auth")`` on sync and async functions and generators. One object may be shared by
    the concurrent requests of one event loop (``AUTH = stage("auth")``; ``with AUTH:``): each run is timed on its
    own. Outside a request it does nothing. The handle it yields has ``set_attribute(key, value)`` for the stage
    span (ignored when not sampled).
    """

    __slots__ = ("_base", "_ctx", "_others", "_parent", "_req", "_span", "_t0", "_token", "attributes", "name")
    _ctx: SpanContext | None
    _parent: SpanContext
    _span: trace.Span | None
    _t0: float
    _token: object

    def __init__(self, name: str, **attributes: Any) -> None:
        if name not in _VALID_NAMES:
            _check_name(name)
        self.name = name
        #: The attributes every run starts with; ``attributes`` are the current run's (``set_attribute``).
        self._base = self.attributes = {k: clean_attribute(v) for k, v in attributes.items()} if attributes else None
        self._req: RequestTelemetry | None = None
        #: Runs of this object entered while it was already running (one object shared by concurrent requests,
        #: or nested in one), by request, innermost last.
        self._others: dict[RequestTelemetry, list[StageScope]] | None = None

    def __enter__(self) -> StageScope:
        req = CURRENT.get()
        if req is not None and not req.finished:  # finished: work after the response (a background task) is no stage
            if self._req is not None or (self._others and req in self._others):
                return self._enter_another(req)
            self._req = req
            if req.sampled:
                self._enter_sampled(req)
            else:
                self._t0 = perf_counter()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._others and self._exit_another(exc_type, exc, tb):
            return
        req = self._req
        if req is not None:
            t1 = perf_counter()
            if req.finished:  # its record and metrics are written: it can only be traced
                if exc_type is None:  # not a stream's generator closed after its client left (GeneratorExit)
                    _ended_after_response(self.name)
            else:
                req.stages.append((self.name, self._t0, t1, "gateway"))
            self._req = None
            if exc_type is not None and exc_type is not GeneratorExit:
                req.stage_error = (exc_type.__qualname__, getattr(exc, "status_code", None))
            if req.sampled:
                self._exit_sampled(req, t1, exc_type)

    def _enter_another(self, req: RequestTelemetry) -> StageScope:
        """This object is already running: time this run with a fresh scope, which ``__exit__`` will find."""
        run = self._fresh()
        run.__enter__()
        if self._others is None:
            self._others = {}
        self._others.setdefault(req, []).append(run)
        return run

    def _fresh(self) -> StageScope:
        """A new scope of this stage with the same attributes (already clean: not cleaned again)."""
        run = StageScope.__new__(StageScope)
        run.name = self.name
        run._base = run.attributes = self._base  # copied before a run changes its own (_enter_sampled)
        run._req = None
        run._others = None
        return run

    def _exit_another(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        """End the current request's innermost extra run, if it has one."""
        current = CURRENT.get()
        runs = self._others.get(current) if self._others and current is not None else None
        if not runs:
            return False
        run = runs.pop()
        if not runs:
            del self._others[current]  # type: ignore[union-attr, arg-type]
        run.__exit__(exc_type, exc, tb)
        return True

    def _enter_sampled(self, req: RequestTelemetry) -> None:
        emitter = req.emitter
        self._span = None
        if emitter is not None:  # SDK fast path: a span context now, the span when the request ends
            parent = self._parent = current_span_context()
            ctx = self._ctx = emitter.child_context(parent)
            self._token = context.attach(trace.set_span_in_context(NonRecordingSpan(ctx)))
            base = self._base
            self.attributes = None if base is None else dict(base)
            self._t0 = perf_counter()
        else:
            self._ctx = None
            t0 = self._t0 = perf_counter()
            self._span, self._token = req.instrumentation.start_stage_span(req, self.name, t0, self._base)

    def _exit_sampled(self, req: RequestTelemetry, t1: float, exc_type: type[BaseException] | None) -> None:
        # A generator closed early (a client that went away mid-stream) is not an error of the stage.
        error = None if exc_type is None or exc_type is GeneratorExit else exc_type.__qualname__
        detach(self._token)
        ctx = self._ctx
        if ctx is not None:
            stage = (self.name, ctx, self._parent, self.attributes, self._t0, t1, error)
            req.pending_stages.append(stage)  # type: ignore[union-attr]
            self._ctx = None
        else:
            span = self._span
            if span is None:
                return
            if error is not None:
                span.set_attribute("error.type", error)
                span.set_status(Status(StatusCode.ERROR, error))
            req.pending_spans.append((span, t1))  # type: ignore[union-attr]  # ended with the request
            self._span = None
        if req.spans_ended:  # a stage of a task that outlived its request: its span ends now
            try:
                req.instrumentation.end_stage_spans(req)
            except Exception:  # as at the request's end: the app's code goes on
                logger.exception("llmpath: ending a stage span of request %s failed", req.request_id)

    async def __aenter__(self) -> StageScope:
        return self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def set_attribute(self, key: str, value: Any) -> None:
        """Set an attribute on the stage span (e.g. the routing decision); a no-op when not sampled."""
        if getattr(self, "_ctx", None) is not None:
            if self.attributes is None:
                self.attributes = {}
            self.attributes[key] = clean_attribute(value)
        elif (span := getattr(self, "_span", None)) is not None:
            span.set_attribute(key, value)

    def __call__(self, fn: F) -> F:
        """Use as a decorator: every call of ``fn`` runs inside a fresh scope of this stage. For a generator
        function (sync or async, e.g. a streamed body) the stage lasts from the first item asked for until the
        generator is exhausted or closed."""
        name, attributes = self.name, self._base
        if inspect.isasyncgenfunction(fn):

            @functools.wraps(fn)
            async def async_gen_wrapper(*args: Any, **kwargs: Any) -> Any:
                t0 = perf_counter()
                try:
                    async for item in fn(*args, **kwargs):
                        yield item
                finally:
                    _record_iteration(name, t0, attributes)

            return async_gen_wrapper  # type: ignore[return-value]
        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def gen_wrapper(*args: Any, **kwargs: Any) -> Any:
                t0 = perf_counter()
                try:
                    yield from fn(*args, **kwargs)
                finally:
                    _record_iteration(name, t0, attributes)

            return gen_wrapper  # type: ignore[return-value]
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with self._fresh():
                    return await fn(*args, **kwargs)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self._fresh():
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]


_LATE_STAGES: set[str] = set()


def _ended_after_response(name: str) -> None:
    """A stage that ended after its request's record was written: say so once per stage name (not silently lost)."""
    if name not in _LATE_STAGES and len(_LATE_STAGES) < 64:
        _LATE_STAGES.add(name)
        logger.warning(
            "llmpath: stage %s ended after the response was sent, so it is in no metric or usage record (only its "
            "span): end stages before the response (e.g. not around the yield of a FastAPI dependency)",
            name,
        )


def _record_iteration(name: str, t0: float, attributes: dict[str, Any] | None) -> None:
    """A decorated generator's stage, recorded when it ends. Its span is not made current across ``yield``: a
    server may resume the generator in another context each time (Starlette does for sync iterators)."""
    req = CURRENT.get()
    if req is not None and not req.finished:
        record_stage(name, perf_counter() - t0, source="gateway", attributes=attributes)


#: ``stage(name, **attributes)`` is the class itself: one call less per stage on the request path.
stage = StageScope


def record_stage(
    name: str,
    seconds: float,
    *,
    end: float | None = None,
    source: str = "backend",
    attributes: Mapping[str, Any] | None = None,
) -> None:
    """Add a stage measured elsewhere (e.g. SGLang's queue time) to the current request's timeline, ending at
    ``end`` (a ``time.perf_counter()`` value; default now). Repeated stages are summed into one observation.
    Negative durations (clock skew between processes) count as zero; a NaN or infinite duration or end is ignored.
    """
    if name not in _VALID_NAMES:
        _check_name(name)
    if source not in TIMING_SOURCES:
        raise ValueError(f"source must be one of {TIMING_SOURCES}, got {source!r}")
    req = CURRENT.get()
    if req is None or req.finished:
        return
    seconds = float(seconds)
    t1 = perf_counter() if end is None else float(end)
    if not (math.isfinite(seconds) and math.isfinite(t1)):
        logger.debug("llmpath: ignoring a non-finite duration or end for stage %s", name)
        return
    t0 = t1 - max(0.0, seconds)
    req.stages.append((name, t0, t1, source))
    if req.sampled:
        emitter = req.emitter
        if emitter is not None:
            attrs = {k: clean_attribute(v) for k, v in attributes.items()} if attributes else {}
            attrs[ATTR_TIMING_SOURCE] = source
            parent = current_span_context()
            req.pending_stages.append((name, emitter.child_context(parent), parent, attrs, t0, t1, None))  # type: ignore[union-attr]
        else:
            req.instrumentation.record_stage_span(req, name, t0, t1, source, attributes)


def mark_first_token(at: float | None = None) -> None:
    """The first token was sent (``at``: a ``time.perf_counter()`` value, default now). Only the first call
    counts; without any call the first non-empty body chunk of a 2xx response is the first token (an error
    response, or one to ``HEAD``, has none: no TTFT, TPOT or ``unattributed`` observation)."""
    req = CURRENT.get()
    if req is not None and req.first_token is None:
        first = perf_counter() if at is None else float(at)
        if math.isfinite(first):
            req.first_token = first


def record_usage(
    *, input_tokens: int, cached_tokens: int, output_tokens: int, model: str, tenant: str | None = None
) -> None:
    """Token accounting for the current request: ``input_tokens`` counts every prompt token, ``cached_tokens`` the
    subset served from cache. Calling it again (a request with several model calls) adds to the counts; ``model``
    and ``tenant`` become the request's labels unless :func:`set_request_labels` set them."""
    n_in, n_cached, n_out = int(input_tokens), int(cached_tokens), int(output_tokens)
    if n_in < 0 or n_cached < 0 or n_out < 0:
        raise ValueError(f"token counts must be >= 0, got input={n_in} cached={n_cached} output={n_out}")
    if n_cached > n_in:
        raise ValueError(f"cached_tokens ({n_cached}) cannot exceed input_tokens ({n_in})")
    req = CURRENT.get()
    if req is None:
        return
    usage = req.usage
    if usage is None:
        req.usage = [n_in, n_cached, n_out]
    else:
        usage[0] += n_in
        usage[1] += n_cached
        usage[2] += n_out
    if req.model is None or req.model_from_call:
        req.model = encodable(model)
        req.model_from_call = False
    if tenant is not None and req.tenant is None:
        req.tenant = encodable(tenant)


def set_request_labels(
    *, route: str | None = None, model: str | None = None, tenant: str | None = None, provider: str | None = None
) -> None:
    """Labels of the current request: the gateway's route name (instead of the route template), the model
    (default ``unknown``), the tenant (only on ``llmpath_tokens_total`` and the usage record) and the GenAI
    provider name. ``None`` leaves a label as it is."""
    req = CURRENT.get()
    if req is None:
        return
    if route is not None:
        req.route = encodable(route)
    if model is not None:
        req.model = encodable(model)
        req.model_from_call = False
    if tenant is not None:
        req.tenant = encodable(tenant)
    if provider is not None:
        req.provider = encodable(provider)
        req.provider_from_call = False


def annotate_request(**fields: Any) -> None:
    """Extra fields for the current request's usage record (``extra``): backend, routing reason, matched prefix
    tokens... Values should be JSON-serialisable (others are stored with ``str``; ``NaN`` and infinities as ``null``).
    Never put prompt text here."""
    req = CURRENT.get()
    if req is None:
        return
    if req.extra is None:
        req.extra = dict(fields)
    else:
        req.extra.update(fields)


def fail_request(status_code: int, error_type: str) -> None:
    """The response failed after its status line was sent (an error event in an SSE stream whose 200 is on the wire):
    the request counts with ``status_code`` in ``llmpath_requests_total{code}`` and the usage record, with
    ``error_type`` (short, content-free) as its error; spans and ``http.server.request.duration`` keep the status
    that was sent, with ``error.type``. Call it before the response's last message."""
    if not 100 <= int(status_code) <= 599:
        raise ValueError(f"status_code must be an HTTP status (100-599), got {status_code!r}")
    req = CURRENT.get()
    if req is None or req.finished:
        return
    req.status_code = int(status_code)
    req.error = encodable(error_type)


def current_request() -> RequestTelemetry | None:
    """The live telemetry of the request being served (id, trace id, start, stage timeline), or ``None``."""
    return CURRENT.get()
