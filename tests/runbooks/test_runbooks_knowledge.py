"""The curated stage-knowledge file: coverage of the catalog, valid queries, panels that exist, clear errors."""

from __future__ import annotations

import re
import subprocess
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmpath.dashboards import expression_problems, known_metric_names
from llmpath.dashboards.checks import iter_panels
from llmpath.instrumentation.catalog import DASHBOARD_UIDS, STAGE_GROUPS, STAGES, stable_panel_id
from llmpath.runbooks.knowledge import KnowledgeError, knowledge_from_data, load_knowledge, parse_knowledge

TEXT = resources.files("llmpath.instrumentation").joinpath("stage_knowledge.toml").read_text(encoding="utf-8")


def _entries():
    k = load_knowledge()
    return [k.path, *k.stages.values(), *k.groups.values()]


def test_covers_every_stage_unattributed_group_and_the_path() -> None:
    k = load_knowledge()
    assert set(k.stages) == {*STAGES.names_with_unattributed}
    assert set(k.groups) == {g.name for g in STAGE_GROUPS}
    for stage in STAGES.names_with_unattributed:
        assert k.entry(stage).key == stage
    assert k.entry(None) is k.path
    for entry in _entries():
        assert entry.causes and entry.diagnosis and entry.mitigations and entry.escalation and entry.panels


def test_every_query_parses_and_reads_known_metrics_and_labels() -> None:
    known = known_metric_names()
    for entry in _entries():
        for check in entry.diagnosis:
            ranges = set(re.findall(r"\[([^\]]+)\]", check.query)) - {":_"}
            assert ranges <= {"$window"}, (entry.key, check.query)
            assert expression_problems(check.query.replace("$window", "5m"), known) == [], (entry.key, check.query)


def test_every_query_is_valid_for_prometheus_2_42(tmp_path: Path, require_binary) -> None:
    promtool = require_binary("promtool")
    rules = [
        {"record": f"check:{entry.key}:{i}", "expr": check.query.replace("$window", "5m")}
        for entry in _entries()
        for i, check in enumerate(entry.diagnosis)
    ]
    path = tmp_path / "knowledge.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "knowledge", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules)} rules found" in result.stdout


def test_every_panel_reference_exists(dashboards: dict[str, dict]) -> None:
    for entry in _entries():
        for ref in entry.panels:
            dashboard_key, _, panel_key = ref.partition("/")
            dashboard = dashboards[f"{DASHBOARD_UIDS[dashboard_key]}.json"]
            assert stable_panel_id(panel_key) in {p["id"] for p in iter_panels(dashboard)}, (entry.key, ref)


def test_stage_specific_mitigations_named_in_the_issue() -> None:
    k = load_knowledge()
    text = {s: " ".join(k.entry(s).mitigations + k.entry(s).causes).lower() for s in k.stages}
    assert all(w in text["schedule"] for w in ("queue", "scale", "shed"))
    assert all(w in text["cache_lookup"] for w in ("hit-rate drop", "ttl", "salt", "routing"))
    assert all(w in text["prefill"] for w in ("prompt", "cache", "gpu"))
    assert all(w in text["route"] for w in ("ejected", "imbalance"))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["stages"].pop("prefill"), "[stages]: no entry for prefill"),
        (lambda d: d["stages"].update(warmup=d["stages"]["auth"]), "warmup not in the stage catalog"),
        (lambda d: d["stages"]["route"].pop("mitigations"), "[stages.route].mitigations"),
        (lambda d: d["stages"]["route"]["diagnosis"][0].pop("query"), "[stages.route].diagnosis[0]"),
        (lambda d: d["groups"]["gateway_overhead"].update(owner="x"), "unknown field(s) owner"),
        (lambda d: d.pop("path"), "[path]: missing"),
        (lambda d: d.update(version=2), "version: expected 1"),
    ],
)
def test_malformed_knowledge_is_rejected_with_entry_and_field(edit, message: str) -> None:
    data = tomllib.loads(TEXT)
    edit(data)
    with pytest.raises(KnowledgeError, match=re.escape(message)):
        knowledge_from_data(data, "k.toml")


def test_toml_syntax_errors_name_the_file() -> None:
    with pytest.raises(KnowledgeError, match=r"^k\.toml: "):
        parse_knowledge("version = \n", "k.toml")


def _matches(matcher: Any, value: str) -> bool:
    import promql_parser

    op = matcher.op
    if op in (promql_parser.MatchOp.Equal, promql_parser.MatchOp.NotEqual):
        hit = matcher.value == value
    else:
        hit = re.fullmatch(matcher.value, value) is not None
    return hit if op in (promql_parser.MatchOp.Equal, promql_parser.MatchOp.Re) else not hit


def test_time_before_the_first_token_leaves_decode_out() -> None:
    """Decode runs after the first token and is most requests' longest stage: a query about the stages before the
    first token must not select it (it pointed on-call at decode)."""
    import promql_parser

    checked = 0
    for entry in _entries():
        for check in entry.diagnosis:
            if "before the first token" not in check.question:
                continue
            for selector in re.findall(r"llmpath_stage_duration_seconds_\w+(?:\{[^}]*\})?", check.query):
                parsed = promql_parser.parse(selector)
                assert isinstance(parsed, promql_parser.VectorSelector), selector
                stage = [m for m in parsed.matchers.matchers if m.name == "stage"]
                assert stage and not all(_matches(m, "decode") for m in stage), (entry.key, selector)
                checked += 1
    assert checked >= 2
