"""OTel export from the standard environment variables: nothing unless asked, then SDK + OTLP/HTTP."""

from __future__ import annotations

import pytest

from llmpath.gateway.otel import SERVICE_NAME, setup_from_env, traces_exporter_name


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "otlp"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, "otlp"),
        ({"OTEL_TRACES_EXPORTER": "console"}, "console"),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, None),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, None),
    ],
)
def test_exporter_from_env(env: dict[str, str], expected: str | None) -> None:
    assert traces_exporter_name(env) == expected


def test_nothing_is_set_up_without_env() -> None:
    setup = setup_from_env({})
    assert setup.tracer_provider is None and setup.meter_provider is None


def test_otlp_provider_with_service_name_and_sampler() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)  # the SDK reads the sampler from the process environment
        setup = setup_from_env(env)
    try:
        provider = setup.tracer_provider
        assert provider.resource.attributes["service.name"] == SERVICE_NAME
        assert "TraceIdRatioBased" in provider.sampler.get_description()
    finally:
        setup.shutdown()
    with pytest.raises(ValueError, match="not supported"):
        setup_from_env({"OTEL_TRACES_EXPORTER": "zipkin"})
