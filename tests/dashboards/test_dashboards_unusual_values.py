"""Dashboards for valid specs and catalogs whose free text (owners, descriptions) holds Grafana's variable syntax."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from llmpath.dashboards import build_dashboards
from llmpath.dashboards.checks import iter_panels
from llmpath.dashboards.slos import SloView
from llmpath.dashboards.specs import SpecOptions, compile_specs, recording_rule_names, slo_views
from llmpath.instrumentation.catalog import STAGES, stable_panel_id

#: Grafana's template variable syntax (public/app/features/variables/utils.ts ``variableRegex``), and a legend's
#: ``{{label}}``.
GRAFANA_VARIABLE = re.compile(r"\$(\w+)|\[\[(\s*\w+)(?::(\w+))?\s*\]\]|\$\{(\w+)(?:\.([^:^\}]+))?(?::([^\}]+))?\}")
LEGEND_LABEL = re.compile(r"\{\{\s*(.+?)\s*\}\}")
OWNER = "$route-oncall {{instance}} [[model]]"
DESCRIPTION = "p95 on ${model} and $__all"
WORD_JOINER = "\u2060"  # what the dashboards put after a "$" to keep Grafana from reading a variable
RULES = {"slo:sli_error:ratio_rate5m", "slo:sli_error:ratio_rate1h", "slo:objective:ratio",
         "slo:error_budget:ratio", "slo:current_burn_rate:ratio", "slo:period_burn_rate:ratio",
         "slo:period_error_budget_remaining:ratio", "sloth_slo_info"}  # fmt: skip

ROUTE_SLO = """\
version: llmpath/v1
service: chat
slos:
  - name: availability
    objective: 99.9
    sli:
      ratio:
        bad: llmpath_requests_total{code=~"5..", route="/v1/chat/completions"}
        total: llmpath_requests_total{route="/v1/chat/completions"}
    alerting:
      name: ChatAvailability
      page_alert: {}
      ticket_alert: {}
"""

FILTERED_SLOS = """\
version: llmpath/v1
service: chat
slos:
  - name: ttft
    objective: 95
    sli:
      latency:
        histogram: llmpath_time_to_first_token_seconds
        threshold: 0.5
        filter: 'route=~"/v1/chat/.*"'
    alerting:
      name: ChatTTFT
      page_alert: {}
      ticket_alert: {}
  - name: prefill
    objective: 95
    sli:
      latency:
        histogram: llmpath_stage_duration_seconds
        threshold: 0.5
        filter: 'stage="prefill"'
    alerting:
      name: ChatPrefill
      page_alert: {}
      ticket_alert: {}
"""


def _texts(dashboard: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, text) of everything Grafana interpolates: titles, descriptions, legends, "no value" texts."""
    for panel in iter_panels(dashboard):
        yield "title", panel.get("title", "")
        yield "description", panel.get("description", "")
        yield "noValue", panel.get("fieldConfig", {}).get("defaults", {}).get("noValue", "")
        for target in panel.get("targets", []):
            yield "legend", target.get("legendFormat", "")


def _interpolated(where: str, text: str) -> list[str]:
    found = [m.group(0) for m in GRAFANA_VARIABLE.finditer(text)]
    if where == "legend" and "oncall" in text:  # the owner's legend: none of its braces are a label
        found += [m.group(0) for m in LEGEND_LABEL.finditer(text)]
    return found


def test_owner_and_description_are_shown_as_written() -> None:
    view = SloView("svc-ttft", "svc", "ttft", 95.0, "30d", "prefill", OWNER, DESCRIPTION, ("5m", "1h"),
                   (("page", 14.4),), ())  # fmt: skip
    stages = STAGES.with_owners({"prefill": OWNER, "gateway_overhead": OWNER})
    dashboards = build_dashboards([view], RULES, stages)
    shown = {(where, text) for d in dashboards.values() for where, text in _texts(d)}
    assert not [(w, t) for w, t in shown if _interpolated(w, t)]
    visible = {t.replace(WORD_JOINER, "") for _, t in shown}
    assert f"svc / ttft — 95% over 30d (stage prefill, {OWNER})" in visible
    assert f"prefill → {OWNER}" in visible  # the owning-stage stat's legend and "no value"
    assert f"prefill — p50 / p95 / p99 (owner: {OWNER})" in visible
    assert f"gateway_overhead — p50 / p95 / p99 (owner: {OWNER})" in visible
    assert any(t.startswith(f"SLO svc/ttft: {DESCRIPTION} ") for t in visible)


def test_an_availability_slo_of_some_routes_does_not_colour_the_api_path(tmp_path: Path) -> None:
    """The API path's error panels show every route's 5xx share; an availability SLO of some routes (a label
    matcher besides `code`) is not theirs, so they keep the generic colours and name no SLO."""
    spec = tmp_path / "routes.yaml"
    spec.write_text(ROUTE_SLO)
    compiled = compile_specs(SpecOptions(inputs=(spec,)))
    dashboards = build_dashboards(slo_views(compiled.slos), recording_rule_names(compiled.files.values()))
    errors = next(p for p in iter_panels(dashboards["llmpath-api-path.json"]) if p["id"] == stable_panel_id(
        "overview:errors"))  # fmt: skip
    steps = [(m["color"], m["value"]) for m in errors["fieldConfig"]["defaults"]["thresholds"]["steps"]]
    assert steps == [("green", None), ("yellow", 0.01), ("red", 0.05)]
    assert "chat-availability" not in errors["description"]


def test_a_latency_slo_with_a_filter_marks_only_its_own_panel(tmp_path: Path) -> None:
    """A TTFT SLO whose `filter` keeps some routes is not the all-requests TTFT panel's threshold; one whose filter
    pins a stage marks that stage's panel as a selector would."""
    spec = tmp_path / "filtered.yaml"
    spec.write_text(FILTERED_SLOS)
    compiled = compile_specs(SpecOptions(inputs=(spec,)))
    dashboards = build_dashboards(slo_views(compiled.slos), recording_rule_names(compiled.files.values()))
    panels = {p["id"]: p for p in iter_panels(dashboards["llmpath-api-path.json"])}
    ttft = panels[stable_panel_id("ttft:latency")]
    assert ttft["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] == "off"
    assert "chat/ttft" not in ttft["description"]
    prefill = panels[stable_panel_id("stage:prefill:latency")]
    assert "chat/prefill: 0.5 s" in prefill["description"]


def test_an_objective_with_seven_digits_is_shown_as_written() -> None:
    view = SloView("svc-nines", "svc", "nines", 99.99999, "30d", None, None, "", ("5m", "1h"), (("page", 14.4),), ())
    dashboard = build_dashboards([view], RULES)["llmpath-slos.json"]
    panels = {p["id"]: p for p in iter_panels(dashboard)}
    assert panels[stable_panel_id("row:slo:svc-nines")]["title"].startswith("svc / nines — 99.99999% over 30d")
    objective = panels[stable_panel_id("slo:svc-nines:objective")]
    assert objective["fieldConfig"]["defaults"]["decimals"] == 5  # percentunit: 0.9999999 → 99.99999%
