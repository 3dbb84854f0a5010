"""Runbooks for valid specs whose values are special to PromQL or Markdown: label values with quotes, backslashes
and runs of spaces, descriptions and owners with `|`, newlines and emphasis characters."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from markdown_it import MarkdownIt
from markdown_it.common.utils import escapeHtml

from llmpath.dashboards import build_dashboards, panel_directory
from llmpath.dashboards.checks import selectors
from llmpath.dashboards.specs import SpecOptions, compile_specs, recording_rule_names, slo_views
from llmpath.instrumentation.catalog import STAGES, Stage, stable_panel_id
from llmpath.runbooks import build_runbooks
from llmpath.runbooks.pages import _with_window
from llmpath.runbooks.render import RunbookError

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


def _tables(markdown_text: str) -> list[list[list[str]]]:
    """Every table as rows of cells (the cells' inline text as rendered)."""
    tokens = MarkdownIt("commonmark").enable("table").parse(markdown_text)
    tables: list[list[list[str]]] = []
    cell = False
    for token in tokens:
        if token.type == "table_open":
            tables.append([])
        elif token.type == "tr_open":
            tables[-1].append([])
        elif token.type in ("th_open", "td_open", "th_close", "td_close"):
            cell = token.type.endswith("_open")
        elif token.type == "inline" and cell:
            tables[-1][-1].append(MarkdownIt("commonmark").renderInline(token.content))
    return tables


def test_free_text_with_markdown_syntax_stays_literal_in_tables(tmp_path: Path) -> None:
    """A description and an owner with `|`, a newline, emphasis, HTML and `$` neither split a table's cells nor
    render as markup: every row keeps its column count and the values read as written."""
    description = "First token | fast *enough* for `chat` <b>users</b> on $route\nsecond_line_"
    owner = "ml|infra *core* <x> [team](http://x)"
    slo, files = _build(tmp_path, "/v1/chat", description, owner)
    page = files[slo.alerts[0].runbook_file]
    header = _tables(page)[0]
    assert [len(row) for row in header] == [2] * len(header)
    cells = {row[0]: row[1] for row in header}
    one_line = " ".join(description.split())
    assert escapeHtml(one_line) in cells["<strong>SLO</strong>"]
    assert cells["<strong>Owning team</strong>"] == f"<strong>{escapeHtml(owner)}</strong>"
    index = _tables(files["README.md"])[0]
    assert [len(row) for row in index] == [6] * len(index)
    assert {row[4] for row in index[1:]} == {escapeHtml(owner)}


def test_panel_links_name_a_catalog_owner_with_markdown_syntax(tmp_path: Path) -> None:
    """A stage owner with `]`, `*` and `_` (from a custom catalog) in a linked panel's title neither ends the link
    text early nor renders as emphasis: the link reads as the panel's title and opens the panel."""
    owner = "serving] *core* _x_"
    stages = STAGES.with_owners({"prefill": owner})
    spec = tmp_path / "odd.yaml"
    spec.write_text(SPEC.format(route="'/v1/chat'", description="d", owner="ml").replace("    owner: ml\n", ""))
    compiled = compile_specs(SpecOptions(inputs=(spec,), stages=stages))
    dashboards = build_dashboards(slo_views(compiled.slos), recording_rule_names(compiled.files.values()), stages)
    files = build_runbooks(compiled.slos, panel_titles=panel_directory(dashboards), stages=stages)
    text = files[compiled.slos[0].alerts[0].runbook_file]
    tokens = MarkdownIt("commonmark").parseInline(text.split("### 2. Open the panels", 1)[1].split("###", 1)[0])
    links = [t for t in tokens[0].children or [] if t.type == "link_open"]
    titles: list[str] = []
    inside = False
    for token in tokens[0].children or []:
        if token.type in ("link_open", "link_close"):
            inside = token.type == "link_open"
            titles += [""] if inside else []
        elif token.type == "text" and inside:
            titles[-1] += token.content
    wanted = f"prefill — p50 / p95 / p99 (owner: {owner}) (llmpath / LLM API path)"
    assert wanted in titles
    panel = stable_panel_id("stage:prefill:latency")
    assert f"viewPanel={panel}&" in str(links[titles.index(wanted)].attrs["href"])


def test_sli_lines_show_the_filter_and_survive_backticks(tmp_path: Path) -> None:
    """A latency SLI's `filter` is part of what makes a request count, and a raw-string (backtick) value must not
    end the code span: each SLI line's code is the query as compiled."""
    spec = tmp_path / "odd.yaml"
    text = SPEC.format(route="'/v1/chat'", description="d", owner="ml")
    spec.write_text(
        text.replace(
            "          route: '/v1/chat'\n", "          route: '/v1/chat'\n        filter: 'model!~`test.*`'\n"
        )
    )
    compiled = compile_specs(SpecOptions(inputs=(spec,)))
    slo = compiled.slos[0]
    page = build_runbooks(compiled.slos)[slo.alerts[0].runbook_file]
    lines = [line for line in page.splitlines() if line.startswith("- ") and "_count" in line or "**bad**" in line]
    codes = {}
    for line in lines:
        tokens = MarkdownIt("commonmark").parseInline(line[2:])[0].children or []
        codes[line.split(":")[0]] = [t.content for t in tokens if t.type == "code_inline"]
    bad = next(v for k, v in codes.items() if "**bad**" in k)
    assert selectors("x" + bad[-1])[0].matchers == (("route", "=", "/v1/chat"), ("model", "!~", "test.*"))
    total = codes["- All events over 5m"][0]
    assert total == " ".join(slo.sli.total_query.replace("{{.window}}", "5m").split())
    assert ("model", "!~", "test.*") in selectors(total)[0].matchers


def test_an_objective_with_seven_digits_is_shown_as_written(tmp_path: Path) -> None:
    """``%g`` keeps six significant digits: 99.99999 read as 100 (an objective no SLO can have)."""
    spec = tmp_path / "odd.yaml"
    spec.write_text(
        SPEC.format(route="'/v1/chat'", description="d", owner="ml").replace("objective: 95", "objective: 99.99999")
    )
    compiled = compile_specs(SpecOptions(inputs=(spec,)))
    text = build_runbooks(compiled.slos)[compiled.slos[0].alerts[0].runbook_file]
    assert "**99.99999%** over **30d**" in text
    assert "the objective (99.99999%) is missed" in text
    assert "100%" not in text


def test_a_custom_stage_meaning_with_markdown_syntax_stays_literal_in_the_short_version(tmp_path: Path) -> None:
    """A custom stage's meaning (from the operator's catalog) is text: ``*``, ``_``, ``<tag>`` and ``[x](y)`` in it
    render as written in the "Short version" paragraph, not as emphasis, HTML or a link (they did)."""
    meaning = "Guard *checks* the <prompt> for __secrets__ [see](http://x)."
    stages = STAGES.with_stage(Stage("guard", meaning, "safety"), after="validate")
    spec = tmp_path / "odd.yaml"
    text = SPEC.format(route="'/v1/chat'", description="d", owner="ml")
    spec.write_text(text.replace("stage: prefill", "stage: guard"))
    compiled = compile_specs(SpecOptions(inputs=(spec,), stages=stages))
    text = build_runbooks(compiled.slos, stages=stages)[compiled.slos[0].alerts[0].runbook_file]
    [short] = [line for line in text.splitlines() if line.startswith("**Short version:**")]
    [inline] = MarkdownIt("commonmark").parseInline(short)
    children = inline.children or []
    assert not [t.type for t in children if t.type not in ("text", "strong_open", "strong_close", "code_inline")]
    assert "".join(t.content for t in children if t.type in ("text", "code_inline")).endswith(meaning)


def test_alert_names_differing_only_in_case_get_runbook_files_of_their_own(tmp_path: Path) -> None:
    """``OddTTFT-page.md`` and ``oddTTFT-page.md`` are one file on macOS and Windows: the compiler qualifies them
    with their SLOs as it does names that are the same (one runbook overwrote the other); names that still differ
    only in case (SLOs whose ids do too) are refused by the runbook build, naming both."""
    spec = tmp_path / "odd.yaml"
    one = SPEC.format(route="'/v1/chat'", description="d", owner="ml")
    two = one.split("slos:\n", 1)[1].replace("name: ttft", "name: ttft-again").replace("OddTTFT", "oddTTFT")
    spec.write_text(one + two)
    compiled = compile_specs(SpecOptions(inputs=(spec,)))
    names = [a.runbook_file for slo in compiled.slos for a in slo.alerts]
    assert len({n.casefold() for n in names}) == len(names) == 4
    assert set(build_runbooks(compiled.slos)) == {*names, "README.md"}
    spec.write_text(one + two.replace("name: ttft-again", "name: TTFT"))
    compiled = compile_specs(SpecOptions(inputs=(spec,)))
    refusal = r"alert oddTTFT .*also the runbook of alert OddTTFT .*'OddTTFT-odd-ttft-page.md': the same file"
    with pytest.raises(RunbookError, match=refusal):
        build_runbooks(compiled.slos)
