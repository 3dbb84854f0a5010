"""OpenTelemetry export configured by the standard ``OTEL_*`` environment variables.

Traces are exported (SDK ``TracerProvider`` + batch processor + OTLP/HTTP exporter) only when
``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_TRACES_EXPORTER`` is set
(``otlp`` or ``console``; ``none`` disables). The sampler comes from ``OTEL_TRACES_SAMPLER`` /
``OTEL_TRACES_SAMPLER_ARG`` (production advice: ``parentbased_traceidratio`` with ``0.1``), the resource from
``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` (service name default ``llmpath-gateway``).
GenAI metrics go out over OTLP only with ``OTEL_METRICS_EXPORTER=otlp`` (Prometheus ``/metrics`` is always on).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("llmpath.gateway.otel")

SERVICE_NAME = "llmpath-gateway"


@dataclass(slots=True)
class OtelSetup:
    tracer_provider: Any = None
    meter_provider: Any = None

    def shutdown(self) -> None:
        for provider in (self.tracer_provider, self.meter_provider):
            if provider is not None:
                provider.shutdown()


def traces_exporter_name(env: Mapping[str, str]) -> str | None:
    """``otlp``, ``console`` or ``None`` (no export) from the environment."""
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    name = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if name:
        return None if name == "none" else name
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return "otlp"
    return None


def setup_from_env(env: Mapping[str, str] | None = None) -> OtelSetup:
    """Providers for what the environment asks for (nothing at all when it asks for nothing)."""
    env = os.environ if env is None else env
    setup = OtelSetup()
    exporter_name = traces_exporter_name(env)
    metrics_name = env.get("OTEL_METRICS_EXPORTER", "").strip().lower()
    if exporter_name is None and metrics_name != "otlp":
        return setup
    from opentelemetry.sdk.resources import Resource

    attributes = {} if env.get("OTEL_SERVICE_NAME") else {"service.name": SERVICE_NAME}
    resource = Resource.create(attributes)
    if exporter_name is not None:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        provider = TracerProvider(resource=resource)
        if exporter_name == "console":
            exporter: Any = ConsoleSpanExporter()
        elif exporter_name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        else:
            raise ValueError(f"OTEL_TRACES_EXPORTER={exporter_name!r} is not supported (use otlp, console or none)")
        provider.add_span_processor(BatchSpanProcessor(exporter))
        setup.tracer_provider = provider
        log.info("exporting traces with the %s exporter", exporter_name)
    if metrics_name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        setup.meter_provider = MeterProvider(
            resource=resource, metric_readers=[PeriodicExportingMetricReader(OTLPMetricExporter())]
        )
    return setup
