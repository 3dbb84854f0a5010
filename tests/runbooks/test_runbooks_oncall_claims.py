"""What the on-call engineer acts on in the generated runbooks: every query returns data over series of every metric
it names (or the runbook says when it is empty), and every config key, CLI flag, endpoint and label value a step
names exists in the real gateway, engine and CLI."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from llmpath.dashboards.synthetic import promtool_returns_data
from llmpath.gateway.admission import REJECTION_REASONS
from llmpath.gateway.prompt_cache import CacheResult
from llmpath.gateway.routing import RouteReason
from llmpath.instrumentation import catalog
from llmpath.runbooks import load_knowledge
from llmpath.runbooks.knowledge import StageKnowledge, custom_stage_entry

LLMPATH = str(Path(sys.executable).parent / "llmpath")
PROMQL_BLOCK = re.compile(r"```promql\n(.*?)\n```", re.DOTALL)
ALERT_BLOCK = re.compile(
    r"<summary>Alert expression</summary>\n\n```promql\n(.*?)\n```\n\n(.*?)\n\n</details>", re.DOTALL
)
#: The SLI's queries listed under "What the SLI measures" (runnable as they are).
SLI_LINE = re.compile(
    r"^- (?:(?:Good|Bad|All)-events counter|(?:Bad events|All events|Error ratio) over \w+): `(.+)`$", re.M
)
BACKTICKED = re.compile(r"`([^`\n]+)`")
CONFIG_KEY = re.compile(r"^([a-z_]+(?:\[\])?(?:\.[a-z_]+(?:\[\])?)+)(?:: (\S+))?$")
ENDPOINT = re.compile(r"^(?:(GET|POST) )?(/[\w/.-]*)(?:\?\S*)?$")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z-]*)(?: ([a-z0-9_]+))?")
#: SGLang 0.5.23 server flags the runbooks name beside the embedded engine's own (which takes neither).
SGLANG_ONLY_FLAGS = {"--max-running-requests", "--mem-fraction-static"}
#: The commands whose options a runbook's bare ``--flag`` may be.
COMMANDS = (("engine", "serve"), ("gateway", "serve"), ("usage", "slowest"), ("usage", "show"))
#: Label values the gateway emits, per (metric, label): what a diagnosis explanation may name.
LABEL_VALUES: dict[tuple[str, str], set[str]] = {
    (catalog.ROUTE_DECISIONS_TOTAL, "reason"): {r.value for r in RouteReason},
    (catalog.ADMISSION_REJECTIONS_TOTAL, "reason"): set(REJECTION_REASONS),
    (catalog.PROMPT_CACHE_LOOKUPS_TOTAL, "result"): {r.value for r in CacheResult},
}


def _entries() -> list[StageKnowledge]:
    """Every knowledge entry, rendered by the default spec or not, and the generic entry of a custom stage."""
    k = load_knowledge()
    return [k.path, *k.stages.values(), *k.groups.values(), custom_stage_entry(catalog.STAGES["auth"])]


def _prose(entry: StageKnowledge) -> list[str]:
    return [entry.summary, *entry.causes, *entry.mitigations, *entry.escalation,
            *(t for c in entry.diagnosis for t in (c.question, c.explain))]  # fmt: skip


def _runbook_prose(text: str) -> str:
    """A runbook without its PromQL blocks (the SLI lines' queries are backticked PromQL too)."""
    return SLI_LINE.sub("", PROMQL_BLOCK.sub("", text))


def _named(runbooks: dict[str, str]) -> dict[str, set[str]]:
    """Every backticked span of the runbooks' and the knowledge file's prose → where it appears."""
    where: dict[str, set[str]] = {}
    for name, text in runbooks.items():
        for span in BACKTICKED.findall(_runbook_prose(text)):
            where.setdefault(span, set()).add(name)
    for entry in _entries():
        for text in _prose(entry):
            for span in BACKTICKED.findall(text):
                where.setdefault(span, set()).add(f"stage_knowledge.toml [{entry.key}]")
    return where


def _rule_files(compiled: Any, tmp: Path) -> list[Path]:
    paths = []
    for name, text in compiled.files.items():
        path = tmp / Path(name).name
        path.write_text(text)
        paths.append(path)
    return paths


def test_every_runbook_query_returns_data(compiled: Any, runbooks: dict[str, str], tmp_path: Path,
                                          require_binary) -> None:  # fmt: skip
    """promtool evaluates every query a runbook asks on-call to run (diagnosis blocks and the SLI's queries) over
    synthetic series of every catalog metric plus the spec's recording rules: each returns data."""
    promtool = require_binary("promtool")
    queries = set()
    for text in runbooks.values():
        text = ALERT_BLOCK.sub("", text)
        queries |= {*PROMQL_BLOCK.findall(text), *SLI_LINE.findall(text)}
    result = promtool_returns_data(promtool, tmp_path, sorted(queries), _rule_files(compiled, tmp_path))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert len(queries) > 100


def test_every_knowledge_query_returns_data(compiled: Any, tmp_path: Path, require_binary) -> None:
    """Also the entries the default spec renders no runbook for (auth, validate, assemble, unattributed, a custom
    stage): a spec that owns an SLO by one of them gets these queries."""
    promtool = require_binary("promtool")
    queries = sorted({c.query.replace("$window", "5m") for e in _entries() for c in e.diagnosis})
    result = promtool_returns_data(promtool, tmp_path, queries, _rule_files(compiled, tmp_path))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert len(queries) > 30


def test_alert_expression_is_the_rule_and_says_when_it_is_empty(
    compiled: Any, runbooks: dict[str, str], tmp_path: Path, require_binary
) -> None:
    """The one query expected to be empty on a healthy system says so; an absent() alert's expression is empty over
    series that have data, as its note says."""
    promtool = require_binary("promtool")
    absent = []
    for slo in compiled.slos:
        for alert in slo.alerts:
            block, note = ALERT_BLOCK.search(runbooks[alert.runbook_file]).groups()  # type: ignore[union-attr]
            assert block == alert.expr.strip(), alert.runbook_file
            if alert.kind == "absent":
                assert note.startswith("Returns 1 while the SLI has no series at all"), note
                absent.append(block)
            else:
                assert note.startswith("Empty while the alert is not firing"), note
    assert absent
    result = promtool_returns_data(promtool, tmp_path, [], _rule_files(compiled, tmp_path), empty=absent)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_an_absent_alert_is_not_said_to_name_the_route(compiled: Any, runbooks: dict[str, str]) -> None:
    """absent() carries only its selector's equality matchers, never the SLO's group_by labels: its runbook must not
    send on-call to "the alert's route label"."""
    checked = 0
    for slo in compiled.slos:
        for alert in (a for a in slo.alerts if a.kind == "absent" and slo.group_by):
            assert not set(slo.group_by) & set(re.findall(r'(\w+)="', alert.expr))
            text = runbooks[alert.runbook_file]
            assert "the alert's labels say which one" not in text
            assert "to the alert's route label" not in text
            assert f"fires only when no `{slo.group_by[0]}` has data" in text
            checked += 1
    assert checked
