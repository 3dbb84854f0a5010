"""The runbooks generated for the default spec: one per alert, the stage and team named, budget math, queries that
parse and read known metrics, links to panels that exist, and a short-period catalog."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from llmpath.dashboards import build_dashboards, expression_problems, known_metric_names, panel_directory
from llmpath.dashboards.checks import iter_panels
from llmpath.dashboards.specs import SpecOptions, compile_specs, recording_rule_names, slo_views
from llmpath.instrumentation.catalog import DASHBOARD_UIDS
from llmpath.runbooks import INDEX, KnowledgeError, RunbookError, build_runbooks, load_knowledge
from llmpath.runbooks.budget import exhaustion_time, humanize

GRAFANA = "https://grafana.example.com"
REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("## Meaning", "## Impact", "## Diagnosis", "## Mitigation", "## Escalation")
PROMQL_BLOCK = re.compile(r"```promql\n(.*?)\n```", re.DOTALL)
LINK = re.compile(r"\]\((https?://[^)]+)\)")


def _alerts(compiled: Any):
    return [(slo, alert) for slo in compiled.slos for alert in slo.alerts]


def test_one_runbook_per_alert_and_an_index(compiled: Any, runbooks: dict[str, str]) -> None:
    files = [alert.runbook_file for _, alert in _alerts(compiled)]
    assert len(files) == len(set(files)) >= 10
    assert set(runbooks) == {*files, INDEX}
    for _slo, alert in _alerts(compiled):
        assert alert.annotations["runbook_url"] == f"runbooks/generated/{alert.runbook_file}"
        assert (REPO / alert.annotations["runbook_url"]).is_file()  # the committed runbook the alert points at
        text = runbooks[alert.runbook_file]
        assert text.splitlines()[1] == f"# {alert.name} ({alert.severity})"
        assert [text.index(s) for s in SECTIONS] == sorted(text.index(s) for s in SECTIONS), alert.runbook_file


def test_runbook_names_the_alerts_stage_and_team(compiled: Any, runbooks: dict[str, str]) -> None:
    for _, alert in _alerts(compiled):
        text = runbooks[alert.runbook_file]
        stage, owner = alert.labels["stage"], alert.labels["owner"]
        assert f"| **Owning stage** | `{stage}` — " in text
        assert f"| **Owning team** | **{owner}** |" in text
        entry = load_knowledge().entry(stage)
        assert all(m in text for m in entry.mitigations), alert.runbook_file  # stage-specific mitigations
        assert all(c.question in text for c in entry.diagnosis)


def test_index_maps_every_alert_to_stage_and_team(compiled: Any, runbooks: dict[str, str]) -> None:
    index = runbooks[INDEX]
    for _, alert in _alerts(compiled):
        row = (
            f"| `{alert.name}` | {alert.severity} | `{alert.slo_id}` | `{alert.labels['stage']}` | "
            f"{alert.labels['owner']} | [{alert.runbook_file}]({alert.runbook_file}) |"
        )
        assert row in index


def test_every_query_parses_and_reads_known_metrics(compiled: Any, runbooks: dict[str, str]) -> None:
    known = known_metric_names(recording_rule_names(compiled.files.values()))
    for name, text in runbooks.items():
        blocks = PROMQL_BLOCK.findall(text)
        assert name == INDEX or len(blocks) >= 5, name
        for query in blocks:
            assert expression_problems(query, known) == [], (name, query)


def test_budget_math_matches_the_alert_windows(compiled: Any, runbooks: dict[str, str]) -> None:
    for slo, alert in _alerts(compiled):
        text = runbooks[alert.runbook_file]
        impact = text[text.index("## Impact") : text.index("## Diagnosis")]
        if alert.kind == "absent":
            assert "no data" in impact
            continue
        fastest = alert.windows[0]
        assert f"({fastest.factor:g}×) the whole {slo.period} error budget is gone in **" in impact
        assert humanize(exhaustion_time(slo.period, fastest.factor)) in impact
        for w in alert.windows:
            assert f"| {w.short} / {w.long} | {w.factor:g}× |" in text
    page = runbooks["LLMAPITTFTBurn-page.md"]
    assert "gone in **about 2.1 days (50 hours)**" in page and "at 6× in about 5 days (120 hours)" in page
    assert "| 5m / 1h | 14.4× | 72% | 2% of 30d |" in page  # 14.4 × 5% budget of a 95% SLO


def test_links_open_panels_that_exist_with_the_alerts_variables(
    compiled: Any, dashboards: dict[str, dict], runbooks: dict[str, str]
) -> None:
    ids = {uid: {p["id"] for p in iter_panels(dashboards[f"{uid}.json"])} for uid in DASHBOARD_UIDS.values()}
    for name, text in runbooks.items():
        for url in LINK.findall(text):
            parsed = urlparse(url)
            assert url.startswith(GRAFANA + "/d/"), url
            uid = parsed.path.removeprefix("/d/")
            query = parse_qs(parsed.query)
            assert int(query["viewPanel"][0]) in ids[uid], (name, url)
            assert query["var-route"] == ["$__all"]
            defined = {v["name"] for v in dashboards[f"{uid}.json"]["templating"]["list"]}
            assert {k.removeprefix("var-") for k in query if k.startswith("var-")} <= defined, (name, url)
    for _slo, alert in _alerts(compiled):
        burn = alert.annotations["dashboard_url"].split("?")[1].split("&")[0]
        assert f"{GRAFANA}/d/llmpath-slos?{burn}&" in runbooks[alert.runbook_file]


def test_runbook_file_collisions_and_missing_panels_are_errors(compiled: Any) -> None:
    slo = compiled.slos[0]
    twin = type(slo.alerts[0])(**{**_fields(slo.alerts[0]), "name": "Other"})
    clash = type(slo)(**{**_fields(slo), "alerts": (*slo.alerts, twin)})
    first = slo.alerts[0]
    with pytest.raises(RunbookError) as err:
        build_runbooks([clash])
    # Both alerts, their SLO and the spec file are named.
    assert str(err.value) == (
        f"{slo.source}: alert Other ({first.severity}) of SLO {slo.id}: runbook_file '{first.runbook_file}' is also "
        f"the runbook of alert {first.name} ({first.severity}) of SLO {slo.id} in {slo.source}; give the alerts "
        "distinct names"
    )
    with pytest.raises(KnowledgeError, match="is not in the generated"):
        build_runbooks(compiled.slos, panel_titles={})


def _fields(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__dataclass_fields__}


def test_short_period_catalog_of_the_end_to_end_test() -> None:
    """The 1h catalog the end-to-end test uses (slo/examples/windows-1h.yaml): minute windows, budget math in
    minutes, diagnosis queries over the alert's short window, and a dashboard for those windows."""
    compiled = compile_specs(SpecOptions(windows_file=REPO / "slo" / "examples" / "windows-1h.yaml"))
    dashboards = build_dashboards(slo_views(compiled.slos), recording_rule_names(compiled.files.values()))
    files = build_runbooks(compiled.slos, GRAFANA, panel_titles=panel_directory(dashboards))
    slo = next(s for s in compiled.slos if s.id == "llm-api-ttft")
    page = next(a for a in slo.alerts if a.severity == "page")
    text = files[page.runbook_file]
    assert slo.period == "1h"
    fastest = page.windows[0]
    assert f"| {fastest.short} / {fastest.long} | {fastest.factor:g}× |" in text
    assert f"gone in **{humanize(exhaustion_time('1h', fastest.factor))}**" in text and "minutes" in text
    assert f"slo:sli_error:ratio_rate{fastest.short}{{" in text and f"[{fastest.short}])" in text
    burn = next(p for p in iter_panels(dashboards["llmpath-slos.json"]) if p["title"] == "Burn rate by window")
    assert fastest.short in {t["legendFormat"].split()[0] for t in burn["targets"]}


def test_a_threshold_runbook_says_what_tripped_it(runbooks: dict[str, str]) -> None:
    """A threshold alert's short version gives its windows and error ratio: a 10-minute page and a 3-day ticket."""
    page = runbooks["LLMAPITTFTMostlySlow-page.md"]
    assert "has had more than 50% bad events over both the last 10m and 2m (its objective allows 5%)" in page
    ticket = runbooks["LLMAPIPromptCacheHitRateLow-ticket.md"]
    assert "more than 50% bad events over both the last 3d and 6h (its objective allows 50%)" in ticket
