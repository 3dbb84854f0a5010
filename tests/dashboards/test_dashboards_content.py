"""What the three dashboards contain, checked on the JSON built for the default spec: issue 6's panel list, units,
variables, deep links, and that every query returns data from Prometheus (promtool 2.42)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jsonschema import Draft7Validator

from llmpath.dashboards import SloView, build_dashboards, burn_panel_id, queries, render_all
from llmpath.dashboards.api_path import stage_latency_key
from llmpath.dashboards.checks import iter_panels
from llmpath.dashboards.links import DASHBOARD_VARIABLES
from llmpath.dashboards.slos import burn_panel_key
from llmpath.dashboards.specs import recording_rule_names, slo_views
from llmpath.dashboards.synthetic import promtool_returns_data
from llmpath.instrumentation import catalog
from llmpath.instrumentation.catalog import STAGES, UNATTRIBUTED, stable_panel_id

REPO = Path(__file__).resolve().parents[2]
PEER_SCHEMA = REPO.parent / "shared" / "peers" / "grafana" / "dashboard.jsonschema.json"
VENDORED_SCHEMA = REPO / "dashboards" / "src" / "llmpath" / "dashboards" / "schema" / "dashboard.jsonschema.json"
SCHEMA_SHA256 = "67451cd5b288f97e3f68eccd52ffa4f75151fc87c669b8cd93c051056b294265"


def _panels(dashboard: dict, type_: str | None = None) -> list[Mapping[str, Any]]:
    return [p for p in iter_panels(dashboard) if p["type"] != "row" and (type_ is None or p["type"] == type_)]


def _by_key(dashboard: dict, key: str) -> Mapping[str, Any]:
    pid = stable_panel_id(key)
    return next(p for p in iter_panels(dashboard) if p["id"] == pid)


def _exprs(panel: Mapping[str, Any]) -> list[str]:
    return [t["expr"] for t in panel["targets"]]


def test_vendored_schema_is_grafanas_file() -> None:
    assert hashlib.sha256(VENDORED_SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256
    if PEER_SCHEMA.is_file():
        assert PEER_SCHEMA.read_bytes() == VENDORED_SCHEMA.read_bytes()


def test_every_dashboard_validates_against_grafanas_schema(dashboards: dict[str, dict]) -> None:
    validator = Draft7Validator(json.loads(VENDORED_SCHEMA.read_text()))
    assert set(dashboards) == {f"{uid}.json" for uid in catalog.DASHBOARD_UIDS.values()}
    for name, dashboard in dashboards.items():
        assert [e.message for e in validator.iter_errors(dashboard)] == [], name
        assert dashboard["schemaVersion"] == 42
        assert dashboard["uid"] == name.removesuffix(".json")
        for legacy in ("__inputs", "rows", "style", "hideControls", "sharedCrosshair", "gnetId"):
            assert legacy not in dashboard


def test_every_panel_has_title_description_unit_and_bound_datasource(dashboards: dict[str, dict]) -> None:
    for name, dashboard in dashboards.items():
        for panel in _panels(dashboard):
            where = (name, panel["title"])
            assert panel["title"] and panel["description"].strip(), where
            assert panel["fieldConfig"]["defaults"]["unit"], where
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
            assert [t["refId"] for t in panel["targets"]] == [chr(65 + i) for i in range(len(panel["targets"]))]
            assert all(t["datasource"] == panel["datasource"] for t in panel["targets"]), where
            assert "Metrics: `" in panel["description"], where


def test_datasource_route_and_model_variables_and_each_is_used(dashboards: dict[str, dict]) -> None:
    expected = {f"{uid}.json": {"datasource", *DASHBOARD_VARIABLES[key]} for key, uid in catalog.DASHBOARD_UIDS.items()}
    # SLO series carry no model label: a model variable there would change nothing.
    assert expected["llmpath-slos.json"] == {"datasource", "route"}
    for name, dashboard in dashboards.items():
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert set(variables) == expected[name], name  # what deep links may set (DASHBOARD_VARIABLES)
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        exprs = [t["expr"] for panel in iter_panels(dashboard) for t in panel.get("targets", [])]
        for var in set(variables) - {"datasource"}:
            assert variables[var]["refresh"] == 2 and variables[var]["includeAll"] and variables[var]["multi"]
            assert variables[var]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert any(f"${var}" in expr for expr in exprs), (name, var)


def test_panel_ids_are_stable_unique_and_output_is_deterministic(compiled: Any, dashboards: dict[str, dict]) -> None:
    for dashboard in dashboards.values():
        ids = [p["id"] for p in iter_panels(dashboard)]
        assert len(ids) == len(set(ids))
    again = build_dashboards(slo_views(compiled.slos), recording_rule_names(compiled.files.values()))
    assert render_all(again) == render_all(dashboards)


def test_api_path_rows_follow_the_request(dashboards: dict[str, dict]) -> None:
    rows = [p["title"] for p in dashboards["llmpath-api-path.json"]["panels"] if p["type"] == "row"]
    expected = ["Overview", "Traffic and errors", "Where the time goes", "Latency per stage", "Time to first token",
                "Routing and admission", "Prompt cache", "Tokens"]  # fmt: skip
    assert [next(r for r in rows if r.startswith(e)) for e in expected] == rows


def test_where_the_time_goes_stacks_stages_in_pipeline_order(dashboards: dict[str, dict]) -> None:
    panel = _by_key(dashboards["llmpath-api-path.json"], "stages:mean")
    assert panel["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    legends = [t["legendFormat"] for t in panel["targets"]]
    assert legends == [*(s.name for s in STAGES if s.before_first_token), UNATTRIBUTED]
    for stage, expr in zip(legends, _exprs(panel), strict=True):
        assert f'{catalog.STAGE_DURATION}_sum{{stage="{stage}"' in expr
        assert f'{catalog.STAGE_DURATION}_count{{stage="{stage}"' in expr
        assert "> 0)" in expr  # guarded mean


def test_per_stage_percentile_panels_are_deep_linkable(dashboards: dict[str, dict]) -> None:
    dashboard = dashboards["llmpath-api-path.json"]
    for stage in (*STAGES.names_with_unattributed, *(g.name for g in catalog.STAGE_GROUPS)):
        panel = _by_key(dashboard, f"stage:{stage}:latency")
        assert [t["legendFormat"] for t in panel["targets"]] == ["p50", "p95", "p99"]
        assert all(f'"{stage}"' in e and "histogram_quantile" in e for e in _exprs(panel))
        assert panel["fieldConfig"]["defaults"]["unit"] == "s"


def test_ttft_tpot_cache_and_token_panels(dashboards: dict[str, dict]) -> None:
    dashboard = dashboards["llmpath-api-path.json"]
    assert all(catalog.TIME_TO_FIRST_TOKEN in e for e in _exprs(_by_key(dashboard, "ttft:latency")))
    assert all(catalog.TIME_PER_OUTPUT_TOKEN in e for e in _exprs(_by_key(dashboard, "tpot:latency")))
    (hit_rate,) = _exprs(_by_key(dashboard, "cache:hit_rate"))
    numerator, denominator = hit_rate.split("\n/\n")
    assert 'type="cached"' in numerator and "by (route)" in numerator
    assert 'type="input"' in denominator and denominator.endswith("> 0)")
    predicted, actual = _exprs(_by_key(dashboard, "cache:predicted_vs_actual"))
    assert catalog.PROMPT_CACHE_PREDICTED_TOKENS_TOTAL in predicted and 'type="cached"' in actual
    # The prediction has no model label, so the actual side must not be narrowed to the selected models either.
    assert "$model" not in predicted and "$model" not in actual and 'route=~"$route"' in actual
    assert "$model" not in _exprs(_by_key(dashboard, "cache:prediction_accuracy"))[0]
    # The ten tenants are chosen once over the whole range, not again at every step of the graph.
    (rate,) = _exprs(_by_key(dashboard, "tokens:top_tenants_rate"))
    assert "\nand on (tenant)\ntopk(10, " in rate and "[$__range] @ end()" in rate
    assert "by (type)" in _exprs(_by_key(dashboard, "tokens:by_type"))[0]
    top = _by_key(dashboard, "tokens:top_tenants")
    assert top["type"] == "table" and top["targets"][0]["instant"]
    assert _exprs(top)[0].startswith("topk(10, sum by (tenant) (increase(")


def test_backends_dashboard_reads_both_sglang_spellings_and_counters(dashboards: dict[str, dict]) -> None:
    dashboard = dashboards["llmpath-backends.json"]
    for panel in _panels(dashboard):
        for expr in _exprs(panel):
            assert "sglang:" not in expr.replace("[:_]", ""), expr  # never one spelling only
    (hit_rate,) = _exprs(_by_key(dashboard, "backends:cache_hit_rate_by_backend"))
    assert "sglang[:_]cached_tokens_total" in hit_rate and "sglang[:_]prompt_tokens_total" in hit_rate
    assert not any("cache_hit_rate" in e for p in _panels(dashboard) for e in _exprs(p))
    for key in ("backends:queue_length", "backends:running_by_backend", "backends:ttft", "backends:itl",
                "backends:kv_usage", "backends:tokens"):  # fmt: skip
        assert _by_key(dashboard, key)
    (share,) = _exprs(_by_key(dashboard, "backends:routing_share"))
    assert catalog.ROUTE_DECISIONS_TOTAL in share and "by (backend)" in share


def test_slo_dashboard_has_a_row_per_slo_and_the_panel_alerts_link_to(
    compiled: Any, dashboards: dict[str, dict]
) -> None:
    dashboard = dashboards["llmpath-slos.json"]
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    assert len(rows) == len(compiled.slos) + 1  # + the overview row
    for slo in compiled.slos:
        burn = next(p for p in iter_panels(dashboard) if p["id"] == burn_panel_id(slo.id))
        assert burn["id"] == stable_panel_id(f"slo:{slo.id}:burn")
        for alert in slo.alerts:
            path, query = alert.annotations["dashboard_url"].split("?")
            assert path.endswith(f"/d/{dashboard['uid']}") and query.split("&")[0] == f"viewPanel={burn['id']}"
        windows = [t["legendFormat"].split()[0] for t in burn["targets"]]
        assert {w.short for a in slo.alerts for w in a.windows} <= set(windows)
        mine = [p for p in _panels(dashboard) if f'sloth_id="{slo.id}"' in " ".join(_exprs(p))]
        titles = {p["title"].split(" (")[0] for p in mine}
        assert {"Objective", "SLI", "Budget remaining", "Burn rate now", "Burn rate", "Firing alerts",
                "Owning stage"} <= titles  # fmt: skip
        owner = _by_key(dashboard, f"slo:{slo.id}:owner")
        assert owner["targets"][0]["legendFormat"] == f"{slo.stage} → {slo.owner}"
    # Burn-rate colours sit at the alerts' factors (Sloth's defaults: tickets at ×1 and ×3, pages from ×6 up).
    availability = next(s for s in compiled.slos if s.name == "availability")
    factors = {w.factor for a in availability.alerts for w in a.windows}
    assert factors == {1, 3, 6, 14.4}
    for key in (burn_panel_key(availability.id), f"slo:{availability.id}:burn_now"):
        marks = _by_key(dashboard, key)["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert [(m["color"], m["value"]) for m in marks] == [("green", None), ("yellow", 1), ("orange", 3), ("red", 6)]
    period = _by_key(dashboard, f"slo:{availability.id}:burn_period")["fieldConfig"]["defaults"]["thresholds"]
    assert [m["value"] for m in period["steps"]] == [None, 0.5, 0.75, 1]  # red once the period's budget is spent


def test_slo_route_filter_only_where_the_sli_keeps_route() -> None:
    views = [
        SloView("a-grouped", "a", "grouped", 99.0, "30d", "route", "platform", "", ("5m", "1h"), (("page", 14.4),),
                ("route",)),
        SloView("a-flat", "a", "flat", 99.0, "30d", None, None, "", ("5m", "1h"), (("page", 14.4),), ()),
    ]  # fmt: skip
    rules = {"slo:sli_error:ratio_rate5m", "slo:sli_error:ratio_rate1h", "slo:objective:ratio",
             "slo:error_budget:ratio", "slo:current_burn_rate:ratio", "slo:period_burn_rate:ratio",
             "slo:period_error_budget_remaining:ratio", "sloth_slo_info"}  # fmt: skip
    dashboard = build_dashboards(views, rules)["llmpath-slos.json"]
    assert 'route=~"$route"' in _exprs(_by_key(dashboard, "slo:a-grouped:sli"))[0]
    assert "route" not in _exprs(_by_key(dashboard, "slo:a-flat:sli"))[0]
    assert "whole request path" in next(p["title"] for p in dashboard["panels"] if p["id"] == stable_panel_id(
        "row:slo:a-flat"))  # fmt: skip


def test_every_query_returns_data_from_prometheus(
    compiled: Any, dashboards: dict[str, dict], tmp_path: Path, require_binary
) -> None:
    """promtool 2.42 (Prometheus' own parser and engine) evaluates every query of all three dashboards over
    synthetic series of every catalog metric plus the default spec's recording rules: each must return data."""
    promtool = require_binary("promtool")
    rule_files = []
    for name, text in compiled.files.items():
        path = tmp_path / Path(name).name
        path.write_text(text)
        rule_files.append(path)
    exprs = [q for dashboard in dashboards.values() for q in queries(dashboard)]
    result = promtool_returns_data(promtool, tmp_path, exprs, rule_files)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert len(exprs) > 100


def test_rate_windows_are_grafana_variables(dashboards: dict[str, dict]) -> None:
    for dashboard in dashboards.values():
        for panel in _panels(dashboard):
            for expr in _exprs(panel):
                assert set(re.findall(r"\[([^\]]+)\]", expr)) - {":_"} <= {"$__rate_interval", "$__range"}, expr


def _steps(panel: Mapping[str, Any]) -> list[tuple[str, float | None]]:
    return [(m["color"], m["value"]) for m in panel["fieldConfig"]["defaults"]["thresholds"]["steps"]]


def _latency_panel_key(sli: Any) -> str:
    """The API-path panel that shows a latency SLI's histogram (written out here, not taken from the code)."""
    if sli.histogram == catalog.STAGE_DURATION:
        return stage_latency_key(sli.selector["stage"])
    if sli.histogram == catalog.STAGE_GROUP_DURATION:
        return stage_latency_key(sli.selector["group"])
    return {catalog.TIME_TO_FIRST_TOKEN: "ttft:latency", catalog.TIME_PER_OUTPUT_TOKEN: "tpot:latency",
            catalog.REQUEST_DURATION: "request:latency"}[sli.histogram]  # fmt: skip


def test_api_path_marks_the_slos_it_measures(compiled: Any, dashboards: dict[str, dict]) -> None:
    dashboard = dashboards["llmpath-api-path.json"]
    # Availability 99.9 %, paging from ×6: yellow from the 0.1 % budget, red from 0.6 %.
    for key in ("overview:errors", "traffic:error_ratio_by_route"):
        assert _steps(_by_key(dashboard, key)) == [("green", None), ("yellow", 0.001), ("red", 0.006)], key
    marked = set()
    latency = [s for s in compiled.slos if s.sli.kind == "latency"]
    assert len(latency) >= 4
    for slo in latency:
        panel = _by_key(dashboard, _latency_panel_key(slo.sli))
        assert ("red", slo.sli.threshold) in _steps(panel), slo.name
        assert panel["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] == "dashed"
        assert f"{slo.service}/{slo.name}: {slo.sli.threshold:g} s" in panel["description"]
        marked.add(panel["id"])
    assert stable_panel_id(stage_latency_key("auth")) not in marked  # no SLO on auth: no line
    auth = _by_key(dashboard, stage_latency_key("auth"))
    assert auth["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] == "off"
    assert "All models" in auth["description"] and "All models" not in _by_key(dashboard, "ttft:latency")["description"]


def test_api_path_without_slos_keeps_generic_error_colours() -> None:
    dashboard = build_dashboards()["llmpath-api-path.json"]
    assert _steps(_by_key(dashboard, "overview:errors")) == [("green", None), ("yellow", 0.01), ("red", 0.05)]
    ttft = _by_key(dashboard, "ttft:latency")
    assert ttft["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] == "off"
