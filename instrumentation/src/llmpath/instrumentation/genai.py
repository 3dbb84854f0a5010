"""OTel semantic-convention metrics through the OTel metrics API: GenAI (v1.41 names) and the HTTP server's
``http.server.request.duration``.

With no MeterProvider configured the API's instruments are no-ops, and :meth:`GenAIMetrics.enabled` lets callers skip
building their attributes too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opentelemetry import metrics

try:  # where the API keeps the global MeterProvider (None until one is set: its stand-in records nothing)
    from opentelemetry.metrics import _internal as _metrics_api

    _metrics_api._METER_PROVIDER  # noqa: B018  # checked here: another API version records always
except (ImportError, AttributeError):  # pragma: no cover
    _metrics_api = None  # type: ignore[assignment]

from llmpath.instrumentation.catalog import (
    GENAI_CLIENT_OPERATION_DURATION,
    GENAI_CLIENT_TIME_PER_OUTPUT_CHUNK,
    GENAI_CLIENT_TIME_TO_FIRST_CHUNK,
    GENAI_CLIENT_TOKEN_USAGE,
    GENAI_SERVER_REQUEST_DURATION,
    GENAI_SERVER_TIME_PER_OUTPUT_TOKEN,
    GENAI_SERVER_TIME_TO_FIRST_TOKEN,
)

# Advisory bucket boundaries from the v1.41 spec (docs/gen-ai/gen-ai-metrics.md).
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
TOKEN_BUCKETS = tuple(float(4**i) for i in range(14))  # 1, 4, 16, ... 67108864
# The HTTP semantic conventions' advice for http.server.request.duration (docs/http/http-metrics.md).
HTTP_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
HTTP_SERVER_REQUEST_DURATION = "http.server.request.duration"

OPERATION = "gen_ai.operation.name"
PROVIDER = "gen_ai.provider.name"
REQUEST_MODEL = "gen_ai.request.model"
TOKEN_TYPE = "gen_ai.token.type"
ERROR_TYPE = "error.type"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"


class GenAIMetrics:
    """The GenAI histograms, and ``http.server.request.duration``, of one meter provider (``None`` = the global
    one)."""

    def __init__(self, meter_provider: metrics.MeterProvider | None = None, version: str = "") -> None:
        meter = metrics.get_meter("llmpath.instrumentation", version, meter_provider=meter_provider)
        #: A real provider records for good (a global one cannot be unset); ``None``: the global one, not set yet.
        self._live: bool | None = (
            None if meter_provider is None else not isinstance(meter_provider, metrics.NoOpMeterProvider)
        )

        def histogram(name: str, unit: str, description: str, buckets: tuple[float, ...]) -> metrics.Histogram:
            return meter.create_histogram(
                name, unit=unit, description=description, explicit_bucket_boundaries_advisory=buckets
            )

        self.server_duration = histogram(
            GENAI_SERVER_REQUEST_DURATION, "s", "Generative AI server request duration.", DURATION_BUCKETS
        )
        self.server_ttft = histogram(
            GENAI_SERVER_TIME_TO_FIRST_TOKEN, "s", "Time to generate the first token.", TTFT_BUCKETS
        )
        self.server_tpot = histogram(
            GENAI_SERVER_TIME_PER_OUTPUT_TOKEN, "s", "Time per output token after the first.", TPOT_BUCKETS
        )
        self.client_duration = histogram(
            GENAI_CLIENT_OPERATION_DURATION, "s", "GenAI operation duration.", DURATION_BUCKETS
        )
        self.client_ttfc = histogram(
            GENAI_CLIENT_TIME_TO_FIRST_CHUNK, "s", "Time to the first chunk of a streamed response.", DURATION_BUCKETS
        )
        self.client_tpoc = histogram(
            GENAI_CLIENT_TIME_PER_OUTPUT_CHUNK,
            "s",
            "Time per output chunk after the first, from the end of the previous chunk to the end of this one.",
            DURATION_BUCKETS,
        )
        self.client_tokens = histogram(
            GENAI_CLIENT_TOKEN_USAGE, "{token}", "Number of input and output tokens used.", TOKEN_BUCKETS
        )
        self.http_server_duration = histogram(
            HTTP_SERVER_REQUEST_DURATION, "s", "Duration of HTTP server requests.", HTTP_DURATION_BUCKETS
        )

    def enabled(self) -> bool:
        """Whether a recording can have an effect: false for a no-op provider, and for the global one until the
        application sets it (an unset global provider's instruments record nothing)."""
        live = self._live
        if live is None:
            if _metrics_api is not None and _metrics_api._METER_PROVIDER is None:
                return False  # not set yet (OTEL_PYTHON_METER_PROVIDER would have set it when the meter was made)
            live = self._live = not isinstance(metrics.get_meter_provider(), metrics.NoOpMeterProvider)
        return live

    def record_server(
        self,
        attributes: Mapping[str, Any],
        *,
        duration: float,
        ttft: float | None,
        tpot: float | None,
        error_type: str | None,
    ) -> None:
        """``gen_ai.server.*`` for one request served by the gateway (TTFT and TPOT only on success)."""
        if error_type is not None:
            self.server_duration.record(duration, {**attributes, ERROR_TYPE: error_type})
            return
        self.server_duration.record(duration, attributes)
        if ttft is not None:
            self.server_ttft.record(ttft, attributes)
        if tpot is not None:
            self.server_tpot.record(tpot, attributes)

    def record_http_server(self, attributes: Mapping[str, Any], duration: float) -> None:
        """``http.server.request.duration`` for one request (when llmpath made its SERVER span)."""
        self.http_server_duration.record(duration, attributes)

    def record_client(
        self,
        attributes: Mapping[str, Any],
        *,
        duration: float,
        time_to_first_chunk: float | None,
        input_tokens: int | None,
        output_tokens: int | None,
        error_type: str | None,
    ) -> None:
        """``gen_ai.client.*`` for one model call made by the gateway."""
        if error_type is not None:
            self.client_duration.record(duration, {**attributes, ERROR_TYPE: error_type})
            return
        self.client_duration.record(duration, attributes)
        if time_to_first_chunk is not None:
            self.client_ttfc.record(time_to_first_chunk, attributes)
        if input_tokens is not None:
            self.client_tokens.record(input_tokens, {**attributes, TOKEN_TYPE: "input"})
        if output_tokens is not None:
            self.client_tokens.record(output_tokens, {**attributes, TOKEN_TYPE: "output"})
