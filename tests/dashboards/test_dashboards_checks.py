"""The checks every generated dashboard goes through: variables, PromQL, metric names, labels, schema, structure."""

from __future__ import annotations

import copy

import pytest

from llmpath.dashboards import build_dashboards, expand, expression_problems, known_metric_names, queries
from llmpath.dashboards.checks import dashboard_problems, metric_names, schema_errors, variable_defaults
from llmpath.instrumentation import catalog

KNOWN = known_metric_names()


@pytest.fixture(scope="module")
def api_path() -> dict:
    return build_dashboards()["llmpath-api-path.json"]


def test_expand_substitutes_every_variable_syntax() -> None:
    expr = 'rate(x{a=~"$route", b=~"${model}", c=~"${route:regex}", d="[[model]]"}[$__rate_interval])'
    assert expand(expr, {"route": "chat", "model": "m", "__rate_interval": "30s"}) == (
        'rate(x{a=~"chat", b=~"m", c=~"chat", d="m"}[30s])'
    )
    assert expand("increase(x[$__range])", {}) == "increase(x[1h])"
    with pytest.raises(KeyError, match=r"\$nope"):
        expand('x{a="$nope"}', {})


def test_queries_use_all_values_by_default_and_accept_overrides(api_path: dict) -> None:
    assert variable_defaults(api_path) == {"datasource": "datasource", "route": ".*", "model": ".*"}
    default = queries(api_path)
    assert default and all("$" not in q for q in default)
    assert any('route=~".*"' in q and "[1m]" in q for q in default)
    chosen = queries(api_path, {"route": "chat", "__rate_interval": "15s"})
    assert len(chosen) == len(default)
    assert any('route=~"chat"' in q and "[15s]" in q for q in chosen)
    assert not any('route=~".*"' in q for q in chosen)


def test_metric_names_resolve_both_sglang_spellings() -> None:
    expr = 'sum(rate({__name__=~"sglang[:_]prompt_tokens_total"}[5m])) / sum(rate(llmpath_requests_total[5m]))'
    assert metric_names(expr, KNOWN) == {
        "sglang:prompt_tokens_total",
        "sglang_prompt_tokens_total",
        "llmpath_requests_total",
    }


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("sum(rate(llmpath_request_total[5m]))", "unknown metric 'llmpath_request_total'"),
        ('{__name__=~"sglang[:_]no_such_metric"}', "matches no known metric"),
        ('sum(rate(llmpath_stage_duration_seconds_count{model="m"}[5m]))', "has no label 'model'"),
        ('sglang:num_queue_reqs{route="x"}', "has no label 'route'"),
        ("sum(rate(llmpath_requests_total[5m])", "does not parse"),
        ("rate(llmpath_requests_total[$__rate_interval])", "does not parse"),
        ('{route="x"}', "selector without a metric name"),
    ],
)
def test_expression_problems_are_found(expr: str, problem: str) -> None:
    problems = expression_problems(expr, KNOWN)
    assert any(problem in p for p in problems), problems


def test_good_expressions_have_no_problems() -> None:
    good = [
        'histogram_quantile(0.95, sum by (le) (rate(llmpath_stage_duration_seconds_bucket{stage="prefill"}[5m])))',
        'sum by (instance) ({__name__=~"sglang[:_]num_queue_reqs", model_name=~".*", worker_addr!=""})',
        'count(ALERTS{alertstate="firing", sloth_id="x"}) or vector(0)',
    ]
    for expr in good:
        assert expression_problems(expr, KNOWN) == [], expr


def test_recording_rules_become_known_only_when_given() -> None:
    expr = 'slo:sli_error:ratio_rate5m{sloth_id="a"}'
    assert expression_problems(expr, KNOWN)
    assert expression_problems(expr, known_metric_names(["slo:sli_error:ratio_rate5m"])) == []


def test_schema_rejects_legacy_grafana_json(api_path: dict) -> None:
    assert schema_errors(api_path) == []
    legacy = copy.deepcopy(api_path)
    legacy["panels"][1]["datasource"] = "Prometheus"
    legacy["rows"] = []
    errors = schema_errors(legacy)
    assert any(e.startswith("panels/1/datasource") for e in errors), errors
    assert any("rows" in e for e in errors), errors


def _first_panel(dashboard: dict, type_: str) -> dict:
    return next(p for p in dashboard["panels"] if p["type"] == type_)


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda p, d: p.update(id=d["panels"][0]["id"]), "id collides"),
        (lambda p, d: p["fieldConfig"]["defaults"].pop("unit"), "no unit"),
        (lambda p, d: p.pop("description"), "no description"),
        (lambda p, d: p["targets"][0].update(expr="rate(llmpath_requests_total[5m])"), "fixed range ['5m']"),
        (lambda p, d: p["targets"][0].update(expr="llmpath_requests_total"), "read without rate()"),
        (lambda p, d: p["targets"][0].update(refId=""), "unique refIds"),
        (lambda p, d: p["targets"][0].update(expr='up{route="$routes"}'), "undefined Grafana variable $routes"),
        (lambda p, d: p["gridPos"].update(x=20, w=8), "exceeds 24 columns"),
        (lambda p, d: p["gridPos"].update(y=0), "overlaps"),
        (lambda p, d: d["annotations"]["list"][0].update(expr="ALERT{x=1"), "annotation 'SLO alerts'"),
    ],
)
def test_structure_problems_are_found(api_path: dict, mutate, problem: str) -> None:
    broken = copy.deepcopy(api_path)
    mutate(_first_panel(broken, "timeseries"), broken)
    problems = dashboard_problems(broken, KNOWN)
    assert any(problem in p for p in problems), problems


def test_variable_query_is_checked(api_path: dict) -> None:
    broken = copy.deepcopy(api_path)
    route = next(v for v in broken["templating"]["list"] if v["name"] == "route")
    route["query"] = "label_values(llmpath_request_total, route)"
    assert any("variable route" in p and "unknown metric" in p for p in dashboard_problems(broken, KNOWN))
    route["query"] = f"label_values({catalog.STAGE_DURATION}_count, model)"
    assert any("variable route" in p and "no label 'model'" in p for p in dashboard_problems(broken, KNOWN))
