"""The promtool test generator: scenarios, predicted firing times and fixtures (no promtool needed here)."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import yaml

from llmpath.slo import CompileOptions, compile_slos, default_spec_path, load_specs
from llmpath.slo.gofmt import parse_duration
from llmpath.slo.matchers import Matcher, regex_example, satisfy

SHORT_WINDOWS = Path(__file__).resolve().parents[2] / "slo" / "examples" / "windows-1h.yaml"


@functools.cache
def _generated(windows: Path | None) -> dict[str, str]:
    return compile_slos(load_specs([default_spec_path()]), CompileOptions(tests=True, windows_file=windows)).test_files


def _tests(windows_file: Path | None = None) -> dict[str, dict]:
    return {name: yaml.safe_load(text) for name, text in _generated(windows_file).items()}


def _first_firing(case: dict, severity: str) -> str | None:
    for test in case["alert_rule_test"]:
        if any(a["exp_labels"]["sloth_severity"] == severity for a in test["exp_alerts"]):
            return test["eval_time"]
    return None


def _minutes(duration: str) -> float:
    return parse_duration(duration) / 60_000


def test_fast_burn_pages_when_the_windows_predict():
    overhead = _tests()["llm-api-gateway-overhead.test.yaml"]
    fast, slow, low, zero = overhead["tests"]
    assert "fast burn (20x" in fast["name"] and "errors from 1d" in fast["name"]
    # 20x burn: the 1h window crosses 14.4x after 14.4/20 of an hour (43.2 min); evaluations every 5 minutes.
    first = _first_firing(fast, "page")
    assert first is not None
    assert _minutes(first) - 24 * 60 == 5 * math.ceil(60 * 14.4 / 20 / 5)
    before = next(t for t in fast["alert_rule_test"] if _minutes(t["eval_time"]) == _minutes(first) - 5)
    assert before["exp_alerts"] == []
    assert _first_firing(slow, "page") is None and _first_firing(slow, "ticket") is not None
    assert all(t["exp_alerts"] == [] for t in low["alert_rule_test"])
    assert zero["input_series"] == [] and all(t["exp_alerts"] == [] for t in zero["alert_rule_test"])
    assert overhead["evaluation_interval"] == "5m" and overhead["rule_files"] == ["../llm-api.yaml"]


def test_a_ttft_outage_pages_within_minutes_through_the_threshold_alert():
    """At 95% the burn-rate page needs 72% of an hour bad (43 minutes into an outage); the default spec's threshold
    page (half the requests slow over 10m and 2m) fires 6 minutes in, and not for the slow burn."""
    ttft = _tests()["llm-api-ttft.test.yaml"]
    fast, slow = ttft["tests"][:2]
    start = _minutes(fast["name"].split("errors from ")[1])
    first = next(t for t in fast["alert_rule_test"] if t["exp_alerts"])
    assert first["alertname"] == "LLMAPITTFTMostlySlow" and _minutes(first["eval_time"]) - start <= 6
    assert {a["exp_labels"]["sloth_severity"] for a in first["exp_alerts"]} == {"page"}
    assert _first_firing(slow, "page") is None and _first_firing(slow, "ticket") is not None


def test_short_catalog_pages_within_minutes_and_absent_fires():
    tests = _tests(windows_file=SHORT_WINDOWS)
    fast = tests["llm-api-ttft.test.yaml"]["tests"][0]
    start = _minutes(fast["name"].split("errors from ")[1])
    first = _first_firing(fast, "page")
    assert first is not None
    assert _minutes(first) - start == 2  # 7.2x over 5m at 20x: after 1.8 minutes
    zero = tests["llm-api-availability.test.yaml"]["tests"][-1]
    (firing,) = [
        t for t in zero["alert_rule_test"] if t["exp_alerts"] and t["alertname"] == "LLMAPIAvailabilityNoData"
    ][:1]
    assert firing["eval_time"] == "2m"
    (alert,) = firing["exp_alerts"]
    assert alert["exp_labels"]["sloth_id"] == "llm-api-availability" and alert["exp_labels"]["stage"] == "route"


def test_per_route_fixture_burns_one_route_and_spells_le_both_ways():
    prefill = _tests()["llm-api-prefill-latency.test.yaml"]
    series = [s["series"] for s in prefill["tests"][0]["input_series"]]
    assert 'llmpath_stage_duration_seconds_bucket{le="0.4",route="r1",stage="prefill"}' in series
    assert 'llmpath_stage_duration_seconds_count{route="r2",stage="prefill"}' in series
    fast = prefill["tests"][0]
    routes = {a["exp_labels"]["route"] for t in fast["alert_rule_test"] for a in t["exp_alerts"]}
    assert routes == {"r1"}
    samples = [
        s
        for e in fast["promql_expr_test"]
        if e["expr"].startswith("slo:sli_error:ratio_rate5m")
        for s in e["exp_samples"]
    ]
    by_route = {s["labels"].split("route=")[1][:4]: s["value"] for s in samples}
    assert by_route == {'"r1"': pytest.approx(0.2), '"r2"': 0.0}  # 20x a 1% budget on r1; r2 healthy


def test_integer_thresholds_use_the_other_le_spelling_on_the_healthy_route(tmp_path):
    spec = default_spec_path().read_text().replace("threshold: 0.4", "threshold: 1")
    path = tmp_path / "spec.yaml"
    path.write_text(spec)
    result = compile_slos(load_specs([path]), CompileOptions(tests=True))
    test = yaml.safe_load(result.test_files["llm-api-prefill-latency.test.yaml"])
    series = {s["series"] for s in test["tests"][0]["input_series"]}
    assert 'llmpath_stage_duration_seconds_bucket{le="1",route="r1",stage="prefill"}' in series
    assert 'llmpath_stage_duration_seconds_bucket{le="1.0",route="r2",stage="prefill"}' in series


def test_cache_slo_only_tests_its_threshold_ticket():
    cache = _tests()["llm-api-prompt-cache-hit-rate.test.yaml"]
    names = [t["name"].split(": ", 1)[1] for t in cache["tests"]]
    assert names[0].startswith("slow burn (2x") and len(names) == 3  # no page alert: no fast burn
    assert _first_firing(cache["tests"][0], "ticket") is not None


def test_values_are_exact_prometheus_floats():
    # rate() multiplies by (extrapolated/sampled)/range, as Prometheus 2.42 does: 72000 * (1/21600), not 72000/21600.
    case = _tests()["llm-api-ttft.test.yaml"]
    fast = case["tests"][0]
    step = _minutes(case["evaluation_interval"])
    (test,) = [e for e in fast["promql_expr_test"] if e["expr"].startswith("slo:sli_error:ratio_rate6h")]
    (value,) = [s["value"] for s in test["exp_samples"] if '"r1"' in s["labels"]]
    start = _minutes(fast["name"].split("errors from ")[1])
    burning = int((_minutes(test["eval_time"]) - start) // step)  # steps with every request slow (95%, 20x)
    per_step = int(fast["input_series"][0]["values"].split("+")[1].split("x")[0])
    steps = int(6 * 60 // step)
    count = per_step * steps * ((21600 / 21600) / 21600)
    bucket = per_step * (steps - burning) * ((21600 / 21600) / 21600)
    assert value == (count - bucket) / count
    assert value != (per_step * steps / 21600 - per_step * (steps - burning) / 21600) / (per_step * steps / 21600)


def test_label_synthesis():
    assert regex_example("(5..|429)") == "500"
    assert regex_example("/v1/(chat|completions)") == "/v1/chat"
    labels = satisfy([Matcher("job", "=", "api"), Matcher("code", "=~", "5..")])
    assert labels == {"job": "api", "code": "500"}
    ok = satisfy([Matcher("job", "=", "api")], must_not=Matcher("code", "=~", "5.."))
    assert ok is not None and not Matcher("code", "=~", "5..").matches(ok)
    assert satisfy([Matcher("a", "=", "x"), Matcher("a", "=", "y")]) is None


def test_or_fallback_sli_is_fed_counters_with_the_error_counter_absent_until_errors_start():
    """`bad or 0 * total` (ratio SLIs): the real query is tested with both sides of `or`. The burning route's
    error counter appears (at 0) just before its first error; the healthy route never has one, so its SLI (0) comes
    from the `0 * total` side."""
    availability = _tests()["llm-api-availability.test.yaml"]
    text = _generated(None)["llm-api-availability.test.yaml"]
    assert (
        "# Traffic: counters for the SLI's selectors (bad and total; groups route=r1, route=r2); the bad counter"
        in (text)
    )
    fast = availability["tests"][0]
    series = {s["series"]: s["values"] for s in fast["input_series"]}
    assert set(series) == {
        'llmpath_requests_total{code="500",route="r1"}',
        'llmpath_requests_total{code="ok",route="r1"}',
        'llmpath_requests_total{code="ok",route="r2"}',
    }
    # Errors start after one day of 5-minute steps: 288 missing samples, then 0 and a run of increments.
    assert series['llmpath_requests_total{code="500",route="r1"}'].startswith("_x288 0+")
    samples = {
        (e["expr"].split("{")[0], s["labels"].split('route="')[1][:2]): s["value"]
        for e in fast["promql_expr_test"]
        for s in e["exp_samples"]
        if "route=" in s["labels"]
    }
    assert samples[("slo:sli_error:ratio_rate5m", "r2")] == 0.0  # only the `or 0 * total` side has r2
    assert samples[("slo:sli_error:ratio_rate5m", "r1")] == pytest.approx(0.02)  # 20x a 0.1% budget
    assert samples[("slo:sli_error:ratio_rate30d", "r2")] == 0.0
    low = availability["tests"][2]  # errors from the start: the counter exists from the first sample
    assert any(s["values"].startswith("0+") for s in low["input_series"] if 'code="500"' in s["series"])
