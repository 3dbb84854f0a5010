"""Runbooks for valid specs whose values are special to PromQL or Markdown: label values with quotes, backslashes
and runs of spaces, descriptions and owners with `|`, newlines and emphasis characters."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from llmpath.dashboards.checks import selectors
from llmpath.dashboards.specs import SpecOptions, compile_specs
from llmpath.runbooks import build_runbooks
from llmpath.runbooks.pages import _with_window

PROMQL_BLOCK = re.compile(r"```promql\n(.*?)\n```", re.DOTALL)
#: A route value that closes the quote and the braces if written into a selector unescaped, and one whose
#: meaning depends on its two spaces.
INJECTION = '/v1/chat"} or vector(1) or {a="\\'
SPACED = "/v1/a  b"
SPEC = """\
version: llmpath/v1
service: odd
slos:
  - name: ttft
    description: {description}
    objective: 95
    stage: prefill
    owner: {owner}
    sli:
      latency:
        histogram: llmpath_time_to_first_token_seconds
        threshold: 0.5
        selector:
          route: {route}
    alerting:
      name: OddTTFT
      page_alert: {{}}
      ticket_alert: {{}}
"""


def _yaml_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _build(tmp_path: Path, route: str, description: str = "d", owner: str = "ml") -> tuple[Any, dict[str, str]]:
    spec = tmp_path / "odd.yaml"
    spec.write_text(
        SPEC.format(route=_yaml_string(route), description=_yaml_string(description), owner=_yaml_string(owner))
    )
    compiled = compile_specs(SpecOptions(inputs=(spec,)))
    return compiled.slos[0], build_runbooks(compiled.slos)


@pytest.mark.parametrize("route", [INJECTION, SPACED])
def test_traffic_query_keeps_the_label_value(tmp_path: Path, route: str) -> None:
    """The "is there traffic" query selects exactly the spec's route value: no quote closed by the value, no run
    of spaces collapsed."""
    slo, files = _build(tmp_path, route)
    text = files[slo.alerts[0].runbook_file]
    count = "sum(rate(llmpath_time_to_first_token_seconds_count"
    traffic = [q for q in PROMQL_BLOCK.findall(text) if q.startswith(count)]
    assert traffic, text
    for query in traffic:
        found = selectors(query)
        assert [s.name for s in found] == ["llmpath_time_to_first_token_seconds_count"], query
        assert ("route", "=", route) in found[0].matchers, query


def test_sli_lines_quote_the_selector(tmp_path: Path) -> None:
    slo, files = _build(tmp_path, INJECTION)
    text = files[slo.alerts[0].runbook_file]
    line = next(line for line in text.splitlines() if "A request is **bad**" in line)
    code = re.search(r"matching `(.*)`\.$", line)
    assert code is not None, line
    assert selectors("x" + code.group(1))[0].matchers == (("route", "=", INJECTION),)


def test_one_line_query_keeps_string_whitespace_and_drops_comments() -> None:
    query = 'sum(rate(x{a="p  q"}[{{.window}}])) # 5xx only\n  /\n  sum(rate(x[{{.window}}]))'
    assert _with_window(query, "5m") == 'sum(rate(x{a="p  q"}[5m])) / sum(rate(x[5m]))'
