"""llmpath/v1 extensions, the default LLM API spec, and the Python API the dashboards and runbooks use."""

from __future__ import annotations

import re

import promql_parser
import pytest
import yaml

from llmpath.instrumentation import catalog
from llmpath.slo import CompileOptions, SpecError, compile_slos, default_spec_path, load_specs
from llmpath.slo.rules import le_regex

SPEC = """\
version: llmpath/v1
service: llm-api
slos:
  - name: prefill
    objective: 99
    stage: prefill
    group_by: [route]
    sli:
      latency:
        histogram: llmpath_stage_duration_seconds
        threshold: 1
        selector:
          stage: prefill
    alerting:
      name: PrefillBurn
"""


def _compile(tmp_path, text: str, **options):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return compile_slos(load_specs([path]), CompileOptions(**options))


def _rules(result) -> list[dict]:
    (text,) = result.files.values()
    return [r for g in yaml.safe_load(text)["groups"] for r in g["rules"]]


def _selectors(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression (walking the parsed tree)."""
    names: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name is not None, f"a selector without a metric name in {expr!r}"
            names.add(node.name)
            return
        for attr in ("expr", "lhs", "rhs", "vector_selector", "param"):
            child = getattr(node, attr, None)
            if child is not None and not isinstance(child, (str, int, float)):
                walk(child)
        for arg in getattr(node, "args", None) or []:
            walk(arg)

    walk(promql_parser.parse(expr))
    return names


@pytest.fixture(scope="module")
def default_result():
    return compile_slos(load_specs([default_spec_path()]))


def test_default_spec_covers_the_llm_api_path(default_result):
    by_name = {s.name: s for s in default_result.slos}
    assert set(by_name) == {
        "availability",
        "ttft",
        "gateway-overhead",
        "scheduling-latency",
        "prefill-latency",
        "time-per-output-token",
        "prompt-cache-hit-rate",
    }
    assert by_name["ttft"].objective == 95 and by_name["ttft"].sli.threshold == 0.5
    assert by_name["ttft"].sli.histogram == catalog.TIME_TO_FIRST_TOKEN
    assert by_name["gateway-overhead"].stage == "gateway_overhead"
    assert by_name["gateway-overhead"].sli.selector == {"group": "gateway_overhead"}
    assert by_name["scheduling-latency"].stage == "schedule" and by_name["prefill-latency"].stage == "prefill"
    assert by_name["prompt-cache-hit-rate"].stage == "cache_lookup"
    tpot = by_name["time-per-output-token"]
    assert (tpot.stage, tpot.owner, tpot.sli.histogram) == ("decode", "serving", catalog.TIME_PER_OUTPUT_TOKEN)
    for slo in default_result.slos:
        assert slo.stage is not None and slo.group_by == ("route",)
        expected_owner = (
            catalog.STAGE_GROUPS_BY_NAME[slo.stage].owner
            if slo.stage in catalog.STAGE_GROUPS_BY_NAME
            else catalog.STAGES.owner(slo.stage)
        )
        assert slo.owner == expected_owner


def test_default_spec_uses_only_catalog_metrics(default_result):
    known = catalog.known_series_names()
    (text,) = default_result.files.values()
    used: set[str] = set()
    for rule in (r for g in yaml.safe_load(text)["groups"] for r in g["rules"]):
        used |= {n for n in _selectors(rule["expr"]) if not n.startswith("slo:")}
    assert used == {
        catalog.REQUESTS_TOTAL,
        f"{catalog.TIME_TO_FIRST_TOKEN}_count",
        f"{catalog.TIME_TO_FIRST_TOKEN}_bucket",
        f"{catalog.TIME_PER_OUTPUT_TOKEN}_count",
        f"{catalog.TIME_PER_OUTPUT_TOKEN}_bucket",
        f"{catalog.STAGE_DURATION}_count",
        f"{catalog.STAGE_DURATION}_bucket",
        f"{catalog.STAGE_GROUP_DURATION}_count",
        f"{catalog.STAGE_GROUP_DURATION}_bucket",
        catalog.TOKENS_TOTAL,
    }
    assert used <= known
    # Every latency threshold is a bucket bound of its histogram.
    for slo in default_result.slos:
        if slo.sli.kind == "latency":
            buckets = (
                catalog.TPOT_BUCKETS if slo.sli.histogram == catalog.TIME_PER_OUTPUT_TOKEN else catalog.LATENCY_BUCKETS
            )
            assert slo.sli.threshold in buckets


def test_default_spec_alerts_carry_stage_owner_runbook_and_dashboard(default_result):
    for slo in default_result.slos:
        panel = catalog.stable_panel_id(f"slo:{slo.id}:burn")
        for alert in slo.alerts:
            assert alert.labels["stage"] == slo.stage and alert.labels["owner"] == slo.owner
            assert alert.runbook_file == f"{alert.name}-{alert.severity}.md"
            assert alert.annotations["runbook_url"] == f"runbooks/generated/{alert.runbook_file}"
            # An absent alert has no route label: its link selects no route (not an empty `var-route=`).
            route = "" if alert.kind == "absent" else "&var-route={{ $labels.route | urlquery }}"
            assert alert.annotations["dashboard_url"] == (
                f"http://localhost:3000/d/{catalog.DASHBOARD_UIDS['slos']}?viewPanel={panel}{route}"
            )
            assert alert.slo_id == slo.id
    kinds = {(s.name, a.kind, a.severity) for s in default_result.slos for a in s.alerts}
    assert ("availability", "absent", "ticket") in kinds
    assert ("prompt-cache-hit-rate", "threshold", "ticket") in kinds
    assert not any(
        a.severity == "page" for s in default_result.slos if s.name == "prompt-cache-hit-rate" for a in s.alerts
    )
    ttft = next(s for s in default_result.slos if s.name == "ttft")
    page = next(a for a in ttft.alerts if a.severity == "page")
    assert page.name == "LLMAPITTFTBurn" and page.kind == "burn_rate"
    assert [(w.short, w.long, w.factor) for w in page.windows] == [("5m", "1h", 14.4), ("30m", "6h", 6.0)]
    assert page.for_ is None and "max(slo:sli_error:ratio_rate5m{" in page.expr


def test_latency_sli_matches_both_le_spellings(tmp_path):
    result = _compile(tmp_path, SPEC)
    rule = next(r for r in _rules(result) if r["record"] == "slo:sli_error:ratio_rate5m")
    assert rule["expr"] == (
        '(sum by (route)(rate(llmpath_stage_duration_seconds_count{stage="prefill"}[5m]))\n-\n'
        'sum by (route)(rate(llmpath_stage_duration_seconds_bucket{stage="prefill",le=~"1(\\\\.0*)?"}[5m])))\n'
        "/\n"
        '((sum by (route)(rate(llmpath_stage_duration_seconds_count{stage="prefill"}[5m]))) > 0)\n'
    )
    for threshold, good, bad in (
        (1.0, ["1", "1.0", "1.00"], ["10", "1.5", "0.1"]),
        (0.5, ["0.5", "0.50"], ["0.05", "5", "0.5.0"]),
    ):
        pattern = le_regex(threshold)
        assert all(re.fullmatch(pattern, s) for s in good) and not any(re.fullmatch(pattern, s) for s in bad)


def test_ratio_sli_counts_missing_error_series_as_zero(tmp_path):
    text = SPEC.replace(
        """      latency:
        histogram: llmpath_stage_duration_seconds
        threshold: 1
        selector:
          stage: prefill""",
        """      ratio:
        bad: llmpath_requests_total{code=~"5.."}
        total: llmpath_requests_total""",
    ).replace("stage: prefill\n", "stage: route\n", 1)
    result = _compile(tmp_path, text)
    (slo,) = result.slos
    assert slo.sli.kind == "ratio" and slo.sli.bad == 'llmpath_requests_total{code=~"5.."}'
    assert slo.sli.error_query == (
        'sum by (route)(rate(llmpath_requests_total{code=~"5.."}[{{.window}}])) or 0 * '
        "sum by (route)(rate(llmpath_requests_total[{{.window}}]))"
    )


def test_count_based_period_rule(tmp_path):
    result = _compile(
        tmp_path, SPEC.replace("    group_by: [route]\n", "    group_by: [route]\n    period_rule: ratio_of_counts\n")
    )
    rules = {r["record"]: r for r in _rules(result) if "record" in r}
    assert rules["slo:sli_error_events:rate5m"]["labels"]["sloth_window"] == "5m"
    ids = '{sloth_id="llm-api-prefill", sloth_service="llm-api", sloth_slo="prefill"}'
    assert rules["slo:sli_error:ratio_rate30d"]["expr"] == (
        f"sum_over_time(slo:sli_error_events:rate5m{ids}[30d])\n"
        "/ ignoring (sloth_window)\n"
        f"(sum_over_time(slo:sli_total_events:rate5m{ids}[30d]) > 0)\n"
    )
    default = {r["record"]: r for r in _rules(_compile(tmp_path, SPEC)) if "record" in r}
    assert "count_over_time(slo:sli_error:ratio_rate5m" in default["slo:sli_error:ratio_rate30d"]["expr"]
    assert "slo:sli_error_events:rate5m" not in default


def test_for_absent_and_threshold_alerts(tmp_path):
    text = SPEC + (
        "      for: 2m\n"
        "      ticket_alert:\n        for: 15m\n"
        "      absent_alert:\n        severity: page\n"
        "      threshold_alert:\n        name: PrefillSlow\n        factor: 2\n"
        "        short_window: 10m\n        long_window: 2h\n"
    )
    result = _compile(tmp_path, text)
    alerts = {(a.name, a.severity): a for a in result.slos[0].alerts}
    assert alerts[("PrefillBurn", "page")].for_ == "2m"
    assert alerts[("PrefillBurn", "ticket")].for_ == "15m"
    absent = alerts[("PrefillBurnNoData", "page")]
    assert absent.kind == "absent" and absent.for_ == "10m"
    ids = '{sloth_id="llm-api-prefill", sloth_service="llm-api", sloth_slo="prefill"}'
    assert absent.expr == f"absent(slo:sli_error:ratio_rate5m{ids})"
    threshold = alerts[("PrefillSlow", "ticket")]
    assert threshold.kind == "threshold" and [(w.short, w.long, w.factor) for w in threshold.windows] == [
        ("10m", "2h", 2.0)
    ]
    assert "slo:sli_error:ratio_rate10m" in {r.get("record") for r in _rules(result)}


def test_owner_override_and_custom_period(tmp_path):
    text = SPEC.replace("version: llmpath/v1\n", "version: llmpath/v1\nperiod: 7d\n").replace(
        "    stage: prefill\n", "    stage: prefill\n    owner: inference-team\n", 1
    )
    (slo,) = _compile(tmp_path, text).slos
    assert slo.owner == "inference-team" and slo.period == "1w"
    assert all(a.labels["owner"] == "inference-team" for a in slo.alerts)


def test_sloth_inputs_get_urls_only_when_asked(sloth_dir):
    path = sloth_dir / "test/integration/prometheus/testdata/in-base.yaml"
    plain = compile_slos(load_specs([path]))
    assert all("runbook_url" not in a.annotations for s in plain.slos for a in s.alerts)
    assert plain.slos[0].alerts[0].runbook_file == "myServiceAlert-page.md"
    with_urls = compile_slos(
        load_specs([path]),
        CompileOptions(runbook_base_url="https://runbooks.example/slo/", dashboard_base_url="https://grafana.example"),
    )
    alert = with_urls.slos[0].alerts[0]
    assert alert.annotations["runbook_url"] == "https://runbooks.example/slo/myServiceAlert-page.md"
    assert alert.annotations["dashboard_url"].startswith("https://grafana.example/d/llmpath-slos?viewPanel=")
    assert "stage" not in alert.labels


def test_runbook_files_are_unique_across_slos(sloth_dir):
    # Both documents of multifile.yml use alert MyServiceHighErrorRate: file names get the SLO id.
    result = compile_slos(load_specs([sloth_dir / "examples" / "multifile.yml"]))
    files = [a.runbook_file for s in result.slos for a in s.alerts]
    assert len(files) == len(set(files)) == 4
    assert "MyServiceHighErrorRate-myservice-requests-availability-page.md" in files


def test_a_plugin_alert_named_like_the_ticket_alert_gets_its_own_runbook(tmp_path):
    """Sloth accepts any alert an SLO plugin adds; one with the ticket alert's name and no severity label (so a
    ticket) keeps a runbook of its own."""
    from llmpath.slo.model import Rule

    def same_name(config):
        def process(request, rules):
            rules.alerts.rules.append(Rule(expr="vector(1)", alert="SvcLatency"))

        return process

    path = tmp_path / "sloth.yaml"
    path.write_text(
        'version: "prometheus/v1"\nservice: svc\nslos:\n  - name: latency\n    objective: 99\n'
        "    sli:\n      events:\n        error_query: sum(rate(slow_total[{{.window}}]))\n"
        "        total_query: sum(rate(all_total[{{.window}}]))\n"
        "    plugins:\n      chain:\n        - id: test/same_name\n    alerting:\n      name: SvcLatency\n"
    )
    result = compile_slos(load_specs([path]), CompileOptions(slo_plugins={"test/same_name": same_name}))
    assert [(a.name, a.severity, a.kind, a.runbook_file) for a in result.slos[0].alerts] == [
        ("SvcLatency", "page", "burn_rate", "SvcLatency-page.md"),
        ("SvcLatency", "ticket", "burn_rate", "SvcLatency-ticket.md"),
        ("SvcLatency", "ticket", "plugin", "SvcLatency-ticket-2.md"),
    ]


def test_unreachable_alerts_are_warnings_for_sloth_specs(tmp_path):
    text = """\
version: "prometheus/v1"
service: svc
slos:
  - name: latency
    objective: 90
    sli:
      events:
        error_query: sum(rate(slow_total[{{.window}}]))
        total_query: sum(rate(all_total[{{.window}}]))
    alerting:
      name: SvcLatency
"""
    result = _compile(tmp_path, text)
    assert any("part of the page alert can never fire" in w.message and "14.4x" in w.message for w in result.warnings)
    with pytest.raises(SpecError):
        _compile(tmp_path, text, strict=True)


def test_compiled_slo_api(default_result):
    ttft = next(s for s in default_result.slos if s.name == "ttft")
    assert ttft.id == "llm-api-ttft" and ttft.service == "llm-api" and ttft.period == "30d"
    assert ttft.spec == "llmpath/v1" and ttft.rule_file == "llm-api.yaml" and ttft.period_rule == "ratio_of_counts"
    assert ttft.error_budget == pytest.approx(0.05)
    assert ttft.source == str(default_spec_path())
    assert "slo:sli_error:ratio_rate5m" in ttft.recordings and "sloth_slo_info" in ttft.recordings
    assert ttft.sli.error_query and "{{.window}}" in ttft.sli.error_query
    assert default_result.file_slos == {"llm-api.yaml": [s.id for s in default_result.slos]}


def test_slo_info_carries_stage_and_owner(default_result):
    (text,) = default_result.files.values()
    infos = [r for g in yaml.safe_load(text)["groups"] for r in g["rules"] if r.get("record") == "sloth_slo_info"]
    assert {(i["labels"]["sloth_slo"], i["labels"]["stage"], i["labels"]["sloth_spec"]) for i in infos} >= {
        ("ttft", "prefill", "llmpath/v1"),
        ("availability", "route", "llmpath/v1"),
    }


SLOW_PAGE = """\
version: llmpath/v1
service: svc
slos:
  - name: ttft
    objective: {objective}
    sli:
      latency:
        histogram: llmpath_time_to_first_token_seconds
        threshold: 0.5
    alerting:
      name: SvcTTFT
{extra}"""
FAST_PAGE = """\
      threshold_alert:
        severity: page
        factor: 10
        short_window: 2m
        long_window: 10m
"""


@pytest.mark.parametrize(
    ("objective", "extra", "warned"),
    [
        (95, "", "the fastest page (14.4x over 1h/5m) fires only after about 43 minutes"),
        (95, FAST_PAGE, None),  # half the requests slow over 10m: 5 minutes
        (99, "", None),  # 14.4% of an hour: about 9 minutes
        # 14.4x cannot fire at all (a separate warning); 6x over 6h needs 60% of 6 hours bad
        (90, "", "(6x over 6h/30m) fires only after about 216 minutes; for a 90% objective add a page threshold_alert"),
    ],
)
def test_a_page_that_takes_long_to_fire_at_100_percent_errors_is_a_warning(tmp_path, objective, extra, warned):
    result = _compile(tmp_path, SLOW_PAGE.format(objective=objective, extra=extra))
    messages = [w.message for w in result.warnings if "with every event bad" in w.message]
    if warned is None:
        assert messages == []
    else:
        assert len(messages) == 1 and warned in messages[0] and "(e.g. factor " in messages[0]
