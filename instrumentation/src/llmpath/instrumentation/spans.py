"""Stage spans at a fraction of the usual cost.

With the OTel SDK, a sampled request's stage spans are not live SDK ``Span`` objects: a stage gets a span id and a
``SpanContext`` when it starts (current while it runs, so spans created inside it nest under it), and when the
request ends its finished span is handed to the tracer's span processors as a ``ReadableSpan`` — what
``Span.end()`` would hand them. Stage spans follow the request's sampling decision (they are children of a sampled
span); processors see them in ``on_end`` only (``on_start`` is skipped) and span limits are not applied to them.
Any other tracer (or ``fast_spans=False``) gets ordinary spans through the OTel API.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import Token
from typing import Any

from opentelemetry import context, trace
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode

from llmpath.instrumentation.text import encodable

try:  # optional: the instrumentation depends on opentelemetry-api only
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace import Tracer as SdkTracer
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
except ImportError:  # pragma: no cover - exercised by the fresh-venv test
    ReadableSpan = SdkTracer = InstrumentationScope = None  # type: ignore[assignment,misc]

UNSET = Status(StatusCode.UNSET)

#: A finished stage awaiting its span: ``(name, context, parent, attributes, start, end, error type)``.
PendingStage = tuple[str, SpanContext, SpanContext, dict[str, Any] | None, float, float, str | None]


class SdkSpanEmitter:
    """Creates span contexts and hands finished spans to an SDK tracer's span processors."""

    __slots__ = ("_on_end", "new_span_id", "resource", "scope")

    def __init__(self, tracer: Any, name: str, version: str) -> None:
        self.new_span_id: Callable[[], int] = tracer.id_generator.generate_span_id
        self._on_end = tracer.span_processor.on_end
        self.resource = tracer.resource
        self.scope = InstrumentationScope(name, version)

    def child_context(self, parent: SpanContext) -> SpanContext:
        """A new span's context under ``parent`` (same trace, flags and state)."""
        return SpanContext(parent.trace_id, self.new_span_id(), False, parent.trace_flags, parent.trace_state)

    def emit(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext,
        attributes: dict[str, Any],
        start_ns: int,
        end_ns: int,
        error: str | None,
    ) -> None:
        """Export one finished INTERNAL span."""
        self._on_end(
            ReadableSpan(
                name=name,
                context=context,
                parent=parent,
                resource=self.resource,
                attributes=attributes,
                kind=SpanKind.INTERNAL,
                status=UNSET if error is None else Status(StatusCode.ERROR, error),
                start_time=start_ns,
                end_time=end_ns,
                instrumentation_scope=self.scope,
            )
        )


def clean_attribute(value: Any) -> Any:
    """An OTel-valid attribute value: primitives and homogeneous sequences pass; anything else becomes ``str``."""
    if isinstance(value, str):
        return encodable(value)
    if isinstance(value, bool | int | float):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, str | bool | int | float) for v in value):
        return tuple(encodable(v) if isinstance(v, str) else v for v in value)
    return encodable(value)


def current_span_context() -> SpanContext:
    """The current span's context (the request's SERVER span, a stage, or the model call)."""
    return trace.get_current_span().get_span_context()


def detach(token: object) -> None:
    """Restore the context a stage or a model call span attached. A ``with stage()`` (or ``model_call_span``) across
    the ``yield``s of a sync generator body is left in another copy of the context than it was entered in (Starlette
    fetches each item in the thread pool with a fresh copy): the copy it was attached in is gone already, so there is
    nothing to restore, and OpenTelemetry would log an error for every request."""
    if isinstance(token, Token):  # OpenTelemetry's default contextvars runtime context
        try:  # noqa: SIM105  # cheaper than contextlib.suppress, on every sampled stage
            token.var.reset(token)
        except ValueError:  # created in another Context
            pass
    else:
        context.detach(token)  # type: ignore[arg-type]
