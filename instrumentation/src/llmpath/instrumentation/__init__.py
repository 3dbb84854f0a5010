"""llmpath instrumentation: per-stage spans, stage metrics and token accounting for any ASGI gateway.

Depends only on ``opentelemetry-api`` and ``prometheus-client``. Quickstart::

    from fastapi import FastAPI
    from llmpath.instrumentation import instrument_app, stage

    app = instrument_app(FastAPI())
"""

from llmpath.instrumentation.api import (
    StageScope,
    annotate_request,
    current_request,
    fail_request,
    mark_first_token,
    record_stage,
    record_usage,
    set_request_labels,
    stage,
)
from llmpath.instrumentation.catalog import (
    DEFAULT_STAGES,
    LATENCY_BUCKETS,
    METRICS,
    STAGE_GROUPS,
    STAGES,
    TOKEN_TYPES,
    TPOT_BUCKETS,
    UNATTRIBUTED,
    MetricSpec,
    PlacementError,
    Stage,
    StageCatalog,
    StageGroup,
)
from llmpath.instrumentation.catalog_file import CatalogFileError, load_catalog
from llmpath.instrumentation.guard import DEFAULT_MAX_LABEL_VALUES, CardinalityGuard
from llmpath.instrumentation.logs import RequestLogFilter
from llmpath.instrumentation.middleware import LLMPathMiddleware, get_instrumentation, instrument_app
from llmpath.instrumentation.request import RequestTelemetry
from llmpath.instrumentation.telemetry import DEFAULT_EXCLUDED_PATHS, Instrumentation, __version__
from llmpath.instrumentation.tracing import (
    ModelCallSpan,
    httpx_trace_hook,
    inject_trace_headers,
    model_call_span,
)
from llmpath.instrumentation.usage import (
    JsonlUsageSink,
    LedgerFormatError,
    SqliteUsageSink,
    StageTiming,
    UsageRecord,
    UsageSink,
    read_jsonl,
    read_sqlite,
)

__all__ = [
    "CatalogFileError",
    "DEFAULT_EXCLUDED_PATHS",
    "DEFAULT_MAX_LABEL_VALUES",
    "DEFAULT_STAGES",
    "LATENCY_BUCKETS",
    "METRICS",
    "STAGES",
    "STAGE_GROUPS",
    "TOKEN_TYPES",
    "TPOT_BUCKETS",
    "UNATTRIBUTED",
    "CardinalityGuard",
    "Instrumentation",
    "JsonlUsageSink",
    "LedgerFormatError",
    "LLMPathMiddleware",
    "MetricSpec",
    "ModelCallSpan",
    "PlacementError",
    "RequestLogFilter",
    "RequestTelemetry",
    "SqliteUsageSink",
    "Stage",
    "StageCatalog",
    "StageGroup",
    "StageScope",
    "StageTiming",
    "UsageRecord",
    "UsageSink",
    "__version__",
    "annotate_request",
    "fail_request",
    "current_request",
    "get_instrumentation",
    "httpx_trace_hook",
    "inject_trace_headers",
    "instrument_app",
    "load_catalog",
    "mark_first_token",
    "model_call_span",
    "read_jsonl",
    "read_sqlite",
    "record_stage",
    "record_usage",
    "set_request_labels",
    "stage",
]
