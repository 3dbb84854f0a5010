"""Bad input: one clear message naming file, SLO and field (line too); exit code 1; nothing written."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest

from llmpath.slo import CompileOptions, SpecError, compile_slos, load_specs

GOOD = """\
version: llmpath/v1
service: llm-api
slos:
  - name: ttft
    objective: 95
    stage: prefill
    sli:
      latency:
        histogram: llmpath_time_to_first_token_seconds
        threshold: 0.5
    alerting:
      name: TTFTBurn
"""

SLOTH_GOOD = """\
version: "prometheus/v1"
service: svc
slos:
  - name: availability
    objective: 99.9
    sli:
      events:
        error_query: sum(rate(http_requests_total{code=~"5.."}[{{.window}}]))
        total_query: sum(rate(http_requests_total[{{.window}}]))
    alerting:
      name: SvcAvailability
"""


def _edit(base: str, old: str, new: str) -> str:
    assert old in base
    return base.replace(old, new)


# (id, spec text, expected message fragment, expected field, expected line, expected SLO)
CASES = [
    ("yaml-syntax", _edit(GOOD, "objective: 95", "objective: [95"), "YAML syntax error", None, 6, None),
    (
        "unknown-version",
        _edit(GOOD, "llmpath/v1", "llmpath/v9"),
        "unknown spec version 'llmpath/v9'",
        "version",
        1,
        None,
    ),
    (
        "objective-101",
        _edit(GOOD, "objective: 95", "objective: 101"),
        "objective must >0 and <=100",
        "slos[0].objective",
        5,
        "llm-api-ttft",
    ),
    (
        "objective-0",
        _edit(GOOD, "objective: 95", "objective: 0"),
        "objective must >0 and <=100",
        "slos[0].objective",
        5,
        "llm-api-ttft",
    ),
    (
        "objective-string",
        _edit(GOOD, "objective: 95", "objective: high"),
        "expected a number",
        "slos[0].objective",
        5,
        "llm-api-ttft",
    ),
    (
        "bad-label-name",
        _edit(GOOD, "    stage: prefill\n", "    stage: prefill\n    labels:\n      bad-name: x\n"),
        "the label key 'bad-name' is not valid",
        "slos[0].labels.bad-name",
        8,
        "llm-api-ttft",
    ),
    (
        "reserved-label",
        _edit(GOOD, "    stage: prefill\n", "    stage: prefill\n    labels:\n      sloth_id: x\n"),
        "is reserved",
        "slos[0].labels.sloth_id",
        8,
        "llm-api-ttft",
    ),
    (
        "no-window",
        _edit(SLOTH_GOOD, 'code=~"5.."}[{{.window}}]', 'code=~"5.."}[5m]'),
        "template must contain the {{ .window }} variable",
        "slos[0].sli.events.error_query",
        8,
        "svc-availability",
    ),
    (
        "bad-promql",
        _edit(
            SLOTH_GOOD,
            "total_query: sum(rate(http_requests_total[{{.window}}]))",
            "total_query: sum(rate(http_requests_total[{{.window}}])",
        ),
        "sli total query expression: unclosed left parenthesis",
        "slos[0].sli.events.total_query",
        9,
        "svc-availability",
    ),
    (
        "disabled-alert-with-labels",
        GOOD + "      page_alert:\n        disable: true\n        labels:\n          team: x\n",
        "the page alert is disabled but has labels",
        "slos[0].alerting.page_alert",
        13,
        "llm-api-ttft",
    ),
    (
        "alerts-without-name",
        _edit(GOOD, "      name: TTFTBurn\n", "      labels:\n        team: x\n"),
        "alert name is required",
        "slos[0].alerting.name",
        None,
        "llm-api-ttft",
    ),
    (
        "unreachable-page",
        _edit(GOOD, "objective: 95", "objective: 50"),
        # 6x (the page's lower factor) x budget < 1 needs a budget under 1/6: an objective above 83.33%.
        "the page alert can never fire with a 50% objective (14.4x over 1h/5m needs an error ratio above 7.2, 6x "
        "over 6h/30m needs an error ratio above 3); raise the objective to at least 83.334%, or disable the alert",
        "slos[0].alerting.page_alert",
        None,
        "llm-api-ttft",
    ),
    (
        "duplicate-key",
        _edit(GOOD, "objective: 95\n", "objective: 95\n    objective: 99\n"),
        "duplicate key 'objective' (first at line 5): a key may appear only once in llmpath/v1",
        "slos[0].objective",
        6,
        "llm-api-ttft",
    ),
    (
        "shared-alerting-for",
        GOOD + "      for: 10 minutes\n",  # inherited by the page and ticket alerts: one problem, where it is
        "not a valid duration string: '10 minutes'",
        "slos[0].alerting.for",
        13,
        "llm-api-ttft",
    ),
    (
        "threshold-alert-named-like-the-ticket",
        GOOD + "      threshold_alert:\n        name: TTFTBurn\n",
        "the threshold alert is named 'TTFTBurn' with severity ticket, like the ticket burn-rate alert: both alerts "
        "would have the same labels and runbook (TTFTBurn-ticket.md)",
        "slos[0].alerting.threshold_alert.name",
        14,
        "llm-api-ttft",
    ),
    (
        "absent-alert-named-like-the-page",
        GOOD + "      absent_alert:\n        name: TTFTBurn\n        severity: page\n",
        "the absent alert is named 'TTFTBurn' with severity page, like the page burn-rate alert",
        "slos[0].alerting.absent_alert.name",
        14,
        "llm-api-ttft",
    ),
    (
        "unknown-stage",
        _edit(GOOD, "stage: prefill", "stage: prefil"),
        "unknown stage 'prefil'",
        "slos[0].stage",
        6,
        "llm-api-ttft",
    ),
    (
        "threshold-not-a-bucket",
        _edit(GOOD, "threshold: 0.5", "threshold: 0.45"),
        "0.45 s is not a bucket boundary of llmpath_time_to_first_token_seconds",
        "slos[0].sli.latency.threshold",
        10,
        "llm-api-ttft",
    ),
    (
        "unknown-key-strict",
        _edit(GOOD, "    stage: prefill\n", "    stage: prefill\n    objectiv: 3\n"),
        "did you mean 'objective'",
        "slos[0].objectiv",
        7,
        "llm-api-ttft",
    ),
    (
        "unknown-label-of-metric",
        _edit(
            GOOD, "        threshold: 0.5\n", "        threshold: 0.5\n        selector:\n          stage: prefill\n"
        ),
        "llmpath_time_to_first_token_seconds has no label 'stage'",
        "slos[0].sli.latency.selector",
        None,
        "llm-api-ttft",
    ),
]


@pytest.mark.parametrize(("text", "message", "field", "line", "slo"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_spec_gets_one_clear_message(tmp_path, text, message, field, line, slo):
    path = tmp_path / "slos.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as err:
        compile_slos(load_specs([path]))
    issues = err.value.issues
    assert len(issues) == 1, [str(i) for i in issues]
    issue = issues[0]
    assert message in issue.message
    assert issue.file == str(path)
    assert issue.field == field
    assert issue.slo == slo
    if line is not None:
        assert issue.line == line
    assert str(path) in str(issue) and (slo is None or slo in str(issue)) and (field is None or field in str(issue))


def test_yaml_error_in_a_later_document_has_file_lines(tmp_path):
    path = tmp_path / "multi.yaml"
    path.write_text(SLOTH_GOOD + "---\n" + _edit(SLOTH_GOOD, "objective: 99.9", "objective: [99.9"))
    with pytest.raises(SpecError) as err:
        load_specs([path])
    (issue,) = err.value.issues
    assert issue.line == 18 and "flow sequence that starts at line 17, column 16" in issue.message


def test_missing_file(tmp_path):
    with pytest.raises(SpecError) as err:
        load_specs([tmp_path / "nope.yaml"])
    assert str(err.value) == f"{tmp_path / 'nope.yaml'}: no such file or folder"


def test_duplicate_ids_across_files(tmp_path):
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yaml").write_text(GOOD)
    with pytest.raises(SpecError) as err:
        compile_slos(load_specs([tmp_path / "a.yaml", tmp_path / "b.yaml"]))
    (issue,) = err.value.issues
    assert issue.file == str(tmp_path / "b.yaml") and issue.slo == "llm-api-ttft"
    assert f"already exists in {tmp_path / 'a.yaml'}" in issue.message


def test_every_problem_is_reported_not_just_the_first(tmp_path):
    text = _edit(_edit(GOOD, "objective: 95", "objective: 101"), "stage: prefill", "stage: nowhere")
    (tmp_path / "slos.yaml").write_text(text)
    with pytest.raises(SpecError) as err:
        compile_slos(load_specs([tmp_path / "slos.yaml"]))
    assert {i.field for i in err.value.issues} == {"slos[0].objective", "slos[0].stage"}


def test_unknown_keys_are_warnings_for_sloth_specs_and_errors_with_strict(tmp_path):
    path = tmp_path / "sloth.yaml"
    path.write_text(
        _edit(SLOTH_GOOD, "      name: SvcAvailability\n", "      name: SvcAvailability\n      pageAlert: {}\n")
    )
    docs = load_specs([path])
    (warning,) = docs[0].warnings
    assert warning.severity == "warning" and warning.field == "slos[0].alerting.pageAlert"
    assert "did you mean 'page_alert'" in warning.message and warning.line == 12
    assert compile_slos(docs).warnings == [warning]
    with pytest.raises(SpecError):
        load_specs([path], strict=True)


def test_strict_turns_warnings_into_errors_and_still_reports_every_problem(tmp_path, llmpath_bin):
    # An unknown key (a warning), a bad top-level label name and an objective over 100 (errors).
    text = _edit(SLOTH_GOOD, "service: svc\n", "service: svc\nlabels:\n  bad-name: x\n")
    text += text[text.index("  - name: availability") :].replace("availability", "latency").replace("99.9", "101")
    text = text.replace("      name: SvcAvailability\n", "      name: SvcAvailability\n      pageAlert: {}\n", 1)
    path = tmp_path / "sloth.yaml"
    path.write_text(text)
    expected = {
        ("labels.bad-name", 4, None, "error"),
        ("slos[0].alerting.pageAlert", 14, "svc-availability", "warning"),
        ("slos[1].objective", 16, "svc-latency", "error"),
    }
    with pytest.raises(SpecError) as lenient:
        compile_slos(load_specs([path]))
    found = {(i.field, i.line, i.slo, i.severity) for i in (*lenient.value.issues, *lenient.value.warnings)}
    assert found == expected
    with pytest.raises(SpecError) as strict:
        compile_slos(load_specs([path]), CompileOptions(strict=True))
    assert {(i.field, i.line, i.slo, "error") for i in strict.value.issues} == {e[:3] + ("error",) for e in expected}
    assert strict.value.warnings == ()

    proc = _run(llmpath_bin, "validate", path)
    assert proc.returncode == 1 and proc.stderr.endswith("2 errors.\n")
    assert "warning: " + f"{path}:14:7: SLO 'svc-availability': slos[0].alerting.pageAlert" in proc.stderr
    proc = _run(llmpath_bin, "validate", "--strict", path)
    assert proc.returncode == 1 and proc.stderr.endswith("3 errors.\n")
    lines = proc.stderr.splitlines()
    assert [line.split(": ")[0] for line in lines[:3]] == [f"{path}:4:3", f"{path}:14:7", f"{path}:16:5"]
    assert "warning: " not in proc.stderr and "unknown key 'pageAlert' (Sloth ignores it)" in lines[1]


def test_top_level_labels_are_reported_once_where_they_are(tmp_path, llmpath_bin):
    second = GOOD[GOOD.index("  - name: ttft") :].replace("name: ttft", "name: ttft-2").replace("TTFTBurn", "TTFT2")
    text = _edit(GOOD, "service: llm-api\n", "service: llm-api\nlabels:\n  bad-name: x\n  stage: y\n") + second
    path = tmp_path / "slos.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as err:
        compile_slos(load_specs([path]))
    issues = sorted(err.value.issues, key=lambda i: i.line or 0)
    assert [(i.field, i.line, i.slo) for i in issues] == [("labels.bad-name", 4, None), ("labels.stage", 5, None)]
    assert "the label key 'bad-name' is not valid" in issues[0].message
    assert "label 'stage' is set by the compiler from `stage:`" in issues[1].message
    # An --extra-label is reported once, as the option, not once per SLO.
    (tmp_path / "ok.yaml").write_text(GOOD + second)
    proc = _run(llmpath_bin, "compile", tmp_path / "ok.yaml", "-o", tmp_path / "out", "-l", "owner=me")
    assert proc.returncode == 1
    assert [line for line in proc.stderr.splitlines() if not line.startswith("warning: ")] == [
        "<input>: --extra-label: label 'owner' is set by the compiler from the `owner:` of llmpath/v1 SLOs; set it "
        "there instead",
        f"1 error; nothing was written to {tmp_path / 'out'}.",
    ]


def test_an_sli_plugin_that_returns_no_string_is_named(tmp_path):
    text = SLOTH_GOOD.replace(
        "      events:\n"
        '        error_query: sum(rate(http_requests_total{code=~"5.."}[{{.window}}]))\n'
        "        total_query: sum(rate(http_requests_total[{{.window}}]))\n",
        "      plugin:\n        id: my_availability\n",
    )
    path = tmp_path / "sloth.yaml"
    path.write_text(text)
    # deliberately not a string: the compiler must name the plugin and what it returned
    options = CompileOptions(sli_plugins={"my_availability": lambda meta, labels, options: 42})  # type: ignore[dict-item, return-value]
    with pytest.raises(SpecError) as err:
        compile_slos(load_specs([path]), options)
    (issue,) = err.value.issues
    assert (issue.field, issue.line, issue.slo) == ("slos[0].sli.plugin.id", 8, "svc-availability")
    assert issue.message.startswith("SLI plugin 'my_availability' returned int 42; an SLI plugin must return")
    no_window = CompileOptions(sli_plugins={"my_availability": lambda meta, labels, options: "sum(rate(x[5m]))"})
    with pytest.raises(SpecError) as err:
        compile_slos(load_specs([path]), no_window)
    (issue,) = err.value.issues
    assert issue.field == "slos[0].sli.plugin.id"
    assert (
        "SLI plugin 'my_availability' returned an invalid query" in issue.message and "{{ .window }}" in issue.message
    )


def test_unsupported_period_names_the_catalogs(tmp_path):
    (tmp_path / "slos.yaml").write_text(GOOD)
    with pytest.raises(SpecError) as err:
        compile_slos(load_specs([tmp_path / "slos.yaml"]), CompileOptions(period="14d"))
    message = err.value.issues[0].message
    assert "the 336h0m0s SLO period time window is not supported" in message and "--windows" in message


# --------------------------------------------------------------------------------------------
# The CLI: exit code 1, the message on stderr, nothing written.
# --------------------------------------------------------------------------------------------

CLI_CASES = [
    "yaml-syntax",
    "unknown-version",
    "objective-101",
    "bad-label-name",
    "no-window",
    "bad-promql",
    "unknown-stage",
]


def _run(llmpath_bin: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([llmpath_bin, "slo", *map(str, args)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_rejects_bad_input_and_writes_nothing(tmp_path, llmpath_bin, case):
    _, text, message, field, _line, _slo = next(c for c in CASES if c[0] == case)
    good = tmp_path / "good.yaml"
    good.write_text(_edit(SLOTH_GOOD, "service: svc", "service: other"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    out = tmp_path / "out"
    proc = _run(llmpath_bin, "compile", good, bad, "-o", out, "--tests")
    assert proc.returncode == 1
    assert message in proc.stderr and str(bad) in proc.stderr
    assert field is None or field in proc.stderr
    assert f"nothing was written to {out}" in proc.stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "good.yaml"]


def test_cli_leaves_an_existing_output_folder_untouched(tmp_path, llmpath_bin):
    out = tmp_path / "out"
    out.mkdir()
    (out / "good.yaml").write_text("previous output\n")
    (tmp_path / "good.yaml").write_text(SLOTH_GOOD)
    (tmp_path / "bad.yaml").write_text(_edit(SLOTH_GOOD, "objective: 99.9", "objective: 100.5"))
    proc = _run(llmpath_bin, "compile", tmp_path / "good.yaml", tmp_path / "bad.yaml", "-o", out)
    assert proc.returncode == 1
    assert [p.name for p in out.iterdir()] == ["good.yaml"]
    assert (out / "good.yaml").read_text() == "previous output\n"


def test_cli_validate_reports_duplicates_across_files(tmp_path, llmpath_bin):
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yaml").write_text(textwrap.dedent(GOOD))
    proc = _run(llmpath_bin, "validate", tmp_path / "a.yaml", tmp_path / "b.yaml")
    assert proc.returncode == 1
    assert "SLO duplicated: ID 'llm-api-ttft' already exists" in proc.stderr


def test_cli_bad_usage(tmp_path, llmpath_bin):
    (tmp_path / "good.yaml").write_text(SLOTH_GOOD)
    proc = _run(llmpath_bin, "compile", tmp_path / "good.yaml", "-o", tmp_path / "out", "--extra-label", "novalue")
    assert proc.returncode == 2 and "KEY=VALUE" in proc.stderr
    proc = _run(llmpath_bin, "compile", tmp_path / "good.yaml", "-o", tmp_path / "out", "-l", "sloth_id=x")
    assert proc.returncode == 1 and "is reserved" in proc.stderr
    assert not (tmp_path / "out").exists()
