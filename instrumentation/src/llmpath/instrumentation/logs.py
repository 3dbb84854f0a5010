"""Log correlation: the current request's id and trace context on every log record.

``RequestLogFilter`` sets ``request_id``, ``trace_id`` and ``span_id`` on each record it sees, so a log format (or a
JSON formatter) can carry them, and a line in the log leads to the request's usage record and trace::

    handler.addFilter(RequestLogFilter())
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s [%(request_id)s %(trace_id)s] %(message)s"))

Attach it to handlers, not loggers: a logger's filters only see the records logged on that very logger, a handler's
see every record it writes, including those propagated from child loggers (uvicorn's access log among them).
"""

from __future__ import annotations

import logging

from opentelemetry import trace

from llmpath.instrumentation.request import CURRENT

#: The value of a field a record has no value for (no request being served, no trace context).
NO_VALUE = "-"
#: The record attributes the filter sets.
LOG_FIELDS = ("request_id", "trace_id", "span_id")


class RequestLogFilter(logging.Filter):
    """Adds ``request_id``, ``trace_id`` (32 hex digits) and ``span_id`` (16) to every record; ``-`` for what is
    unknown (a record logged outside a request, or without tracing; the ``span_id`` of a span not sampled). Values
    already on a record (``extra=``) are kept. Never filters anything out."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = record.__dict__
        if "request_id" in fields and "trace_id" in fields and "span_id" in fields:
            return True  # set by the caller, or by this filter on another handler
        req = CURRENT.get()
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            trace_id = format(ctx.trace_id, "032x")
            # An unsampled span is never exported: its id would lead nowhere.
            span_id = format(ctx.span_id, "016x") if ctx.trace_flags.sampled else NO_VALUE
        else:
            trace_id = (req.trace_id if req is not None else None) or NO_VALUE  # the one in its usage record
            span_id = NO_VALUE
        fields.setdefault("request_id", NO_VALUE if req is None else req.request_id)
        fields.setdefault("trace_id", trace_id)
        fields.setdefault("span_id", span_id)
        return True
