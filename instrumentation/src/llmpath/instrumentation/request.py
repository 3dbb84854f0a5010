"""The live telemetry of one request: a slotted object in a context variable, cheap to update on the hot path.

Stages append ``(name, start, end, source)`` tuples of ``perf_counter`` seconds; spans, histograms and the usage
record are produced once, when the request finishes.
"""

from __future__ import annotations

from contextvars import ContextVar
from operator import itemgetter
from time import perf_counter
from typing import TYPE_CHECKING, Any

from llmpath.instrumentation.usage import StageTiming

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from llmpath.instrumentation.spans import PendingStage, SdkSpanEmitter
    from llmpath.instrumentation.telemetry import Instrumentation

#: Status recorded when the client went away before the response completed (nginx's convention).
CLIENT_CLOSED_REQUEST = 499
#: ``(stage name, start, end, timing source)``, ``perf_counter`` seconds.
StageInterval = tuple[str, float, float, str]


class RequestTelemetry:
    """What llmpath knows about the request being served; ``current_request()`` returns it.

    Public, read-only for callers: ``request_id``, ``trace_id``, ``start_time`` (epoch seconds), ``route``,
    ``model``, ``tenant``, ``sampled``, ``first_token_s``, ``elapsed_s`` and ``timeline()``.
    """

    __slots__ = (
        "_route",
        "emitter",
        "end",
        "error",
        "extra",
        "finished",
        "first_token",
        "instrumentation",
        "method",
        "model",
        "model_from_call",
        "operation",
        "owns_span",
        "path",
        "pending_spans",
        "pending_stages",
        "provider",
        "provider_from_call",
        "request_id",
        "response_started",
        "response_status",
        "sampled",
        "scope",
        "span",
        "spans_ended",
        "stage_error",
        "stages",
        "start",
        "start_ns",
        "status_code",
        "tenant",
        "trace_id_int",
        "usage",
    )

    def __init__(self, instrumentation: Instrumentation, request_id: str, start: float, start_ns: int) -> None:
        self.instrumentation = instrumentation
        self.request_id = request_id
        self.start = start
        self.start_ns = start_ns
        self.stages: list[StageInterval] = []
        #: Sampled, SDK fast path: finished stages whose spans are emitted when the request ends.
        self.pending_stages: list[PendingStage] | None = None
        #: Sampled, any other tracer: live stage spans, ended when the request ends.
        self.pending_spans: list[tuple[Span, float]] | None = None
        self.emitter: SdkSpanEmitter | None = None
        self.span: Span | None = None
        self.owns_span = False
        self.sampled = False
        self.trace_id_int = 0
        self._route: str | None = None
        self.model: str | None = None
        #: ``model`` is only the model call's requested model: ``record_usage`` may still name the model.
        self.model_from_call = False
        self.tenant: str | None = None
        self.provider: str | None = None
        #: ``provider`` comes from the latest model call (a retry on another backend may change it), not from
        #: ``set_request_labels``.
        self.provider_from_call = False
        self.first_token: float | None = None
        self.end: float | None = None
        self.usage: list[int] | None = None
        self.extra: dict[str, Any] | None = None
        #: ``gen_ai.operation.name`` of the request's model call (``chat`` when none named it).
        self.operation: str | None = None
        self.status_code = 0
        self.response_started = False
        #: The status actually sent (``status_code`` becomes 499 when the client leaves mid-stream).
        self.response_status: int | None = None
        self.finished = False
        #: The request's spans were ended (sampled): a stage span ending later is ended at once.
        self.spans_ended = False
        self.error: str | None = None
        #: The class name and ``status_code`` (if any) of the latest exception that escaped a stage.
        self.stage_error: tuple[str, Any] | None = None
        self.scope: dict[str, Any] | None = None
        self.method = ""
        self.path = ""

    # ---- read-only views -------------------------------------------------------------------

    @property
    def trace_id(self) -> str | None:
        """The W3C trace id (32 hex digits), or ``None`` when no tracing is configured and no parent came in."""
        return self.trace_id_int.to_bytes(16).hex() if self.trace_id_int else None

    @property
    def start_time(self) -> float:
        """Request start, seconds since the epoch."""
        return self.start_ns / 1e9

    @property
    def route(self) -> str:
        """The ``route`` label: the gateway's route name, else the route template, else the path."""
        if self._route is not None:
            return self._route
        return self.instrumentation.default_route(self)

    @route.setter
    def route(self, value: str | None) -> None:
        self._route = value

    @property
    def first_token_s(self) -> float | None:
        """Time to first token so far (``None`` until the first token)."""
        return None if self.first_token is None else self.first_token - self.start

    @property
    def elapsed_s(self) -> float:
        """Seconds since the request started (its duration once finished)."""
        return (self.end if self.end is not None else perf_counter()) - self.start

    def timeline(self) -> list[StageTiming]:
        """The stages recorded so far, as offsets from the request start, in start order."""
        start = self.start
        return [
            StageTiming(name, s - start, e - s, source) for name, s, e, source in sorted(self.stages, key=_BY_START)
        ]

    def epoch_ns(self, t: float) -> int:
        """A ``perf_counter`` time as epoch nanoseconds (for explicit span start/end times)."""
        return self.start_ns + int((t - self.start) * 1e9)

    def __repr__(self) -> str:
        return f"RequestTelemetry(request_id={self.request_id!r}, route={self.route!r}, stages={len(self.stages)})"


_BY_START = itemgetter(1)


CURRENT: ContextVar[RequestTelemetry | None] = ContextVar("llmpath_request", default=None)
