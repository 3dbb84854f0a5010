"""Bad and unusual specs found by mutating valid ones: every command either compiles them into rules that promtool
accepts, or exits 1 naming the file, field and reason — no traceback, nothing written."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from llmpath.cli import app
from llmpath.slo import CompileOptions, SpecError, compile_slos, load_specs
from llmpath.slo.gotemplate import prometheus_template_error
from tests.slo.test_slo_bad_input import SLOTH_GOOD

LLMPATH = """\
version: llmpath/v1
service: llm-api
slos:
  - name: ttft
    objective: 95
    stage: prefill
    group_by: [route]
    sli:
      latency:
        histogram: llmpath_time_to_first_token_seconds
        threshold: 0.5
    alerting:
      name: TTFTBurn
      threshold_alert:
        name: TTFTSlow
        severity: page
        factor: 10
        short_window: 2m
        long_window: 10m
"""

SLOTH = (
    SLOTH_GOOD
    + """\
      annotations:
        summary: high
      page_alert:
        labels:
          severity: pageteam
"""
)


def _edit(base: str, old: str, new: str) -> str:
    assert old in base
    return base.replace(old, new)


def _cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback is a failure of the test, with its stack
    return result.exit_code, result.output


def _flat(output: str) -> str:
    """A usage error's text without the box rich draws around it and without white space (it wraps lines)."""
    return "".join(ch for ch in output if not ch.isspace() and ch not in "│╭╮╰╯─")


def _spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "slos.yaml"
    path.write_text(text)
    return path


def _assert_rejected(tmp_path: Path, text: str, field: str, reason: str) -> None:
    """Every command that reads specs exits 1 with one line naming the file, field and reason; nothing written."""
    spec = _spec(tmp_path, text)
    commands = [
        ("slo", "validate", spec),
        ("slo", "compile", spec, "-o", tmp_path / "rules", "--tests"),
        ("dashboards", "build", "--slo", spec, "-o", tmp_path / "dashboards"),
        ("runbooks", "build", "--slo", spec, "-o", tmp_path / "runbooks"),
    ]
    for command in commands:
        code, output = _cli(*command)
        assert code == 1, (command, output)
        lines = [line for line in output.splitlines() if f"{spec}:" in line and f": {field}: " in line]
        assert len(lines) == 1 and reason in lines[0], (command, output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slos.yaml"]


def _promtool(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_long_names_give_bounded_file_names_that_every_command_can_write(tmp_path):
    """A 260-character SLO name and alert name are valid (Sloth sets no limit), but `<slo id>.test.yaml` and
    `<alert>-<severity>.md` were longer than the 255 bytes a file name may have: compile --tests and runbooks
    build died with OSError."""
    text = _edit(_edit(SLOTH, "name: availability", "name: " + "a" * 260), "SvcAvailability", "Svc" + "A" * 260)
    spec = _spec(tmp_path, text)
    code, output = _cli("slo", "compile", spec, "-o", tmp_path / "rules", "--tests")
    assert code == 0, output
    (test_file,) = (tmp_path / "rules" / "tests").iterdir()
    assert test_file.name.startswith("svc-aaaa") and test_file.name.endswith(".test.yaml")
    assert len(test_file.name) == 200 and "~" in test_file.name
    code, output = _cli("runbooks", "build", "--slo", spec, "-o", tmp_path / "runbooks")
    assert code == 0, output
    runbooks = sorted(p.name for p in (tmp_path / "runbooks").iterdir() if p.name != "README.md")
    assert len(runbooks) == 2 and all(len(name) <= 200 and name.startswith("SvcAAAA") for name in runbooks)
    assert {name.rsplit("-", 1)[1] for name in runbooks} == {"page.md", "ticket.md"}
    # The rule file's runbook URLs name exactly those files.
    code, output = _cli("slo", "compile", spec, "-o", "-", "--runbook-base-url", "https://rb")
    assert code == 0 and sorted(f"https://rb/{name}" for name in runbooks) == sorted(
        line.split("runbook_url: ")[1] for line in output.splitlines() if "runbook_url: " in line
    )


@pytest.mark.parametrize(
    ("old", "new", "field", "reason"),
    [
        # A [0s] range does not parse in Prometheus; dashboards and runbooks build died with ValueError.
        ("short_window: 2m", "short_window: 0s", "slos[0].alerting.threshold_alert.short_window", "longer than 0"),
        ("short_window: 2m", "short_window: '0'", "slos[0].alerting.threshold_alert.short_window", "longer than 0"),
        # Prometheus keeps durations as int64 nanoseconds: promtool rejected the whole file.
        ("factor: 10\n", "factor: 10\n        for: 293y\n", "slos[0].alerting.threshold_alert.for", "out of range"),
    ],
    ids=["window-0s", "window-0", "for-293y"],
)
def test_durations_prometheus_cannot_load_are_rejected(tmp_path, old, new, field, reason):
    _assert_rejected(tmp_path, _edit(LLMPATH, old, new), field, reason)


def test_the_longest_duration_prometheus_loads_is_accepted(tmp_path, require_binary):
    require_binary("promtool")
    spec = _spec(tmp_path, _edit(LLMPATH, "factor: 10\n", "factor: 10\n        for: 292y\n"))
    code, output = _cli("slo", "compile", spec, "-o", tmp_path / "rules")
    assert code == 0, output
    check = _promtool("check", "rules", tmp_path / "rules" / "slos.yaml")
    assert check.returncode == 0, check.stdout + check.stderr


# Prometheus parses every label and annotation value of an alerting rule as a Go template: one that does not parse
# made promtool reject the whole rule file ("template: __alert_X:1: unclosed action"), yet compile exited 0.
TEMPLATE_CASES = [
    (SLOTH, "severity: pageteam", "severity: 'a{{b'", "slos[0].alerting.page_alert.labels.severity", "unclosed action"),
    (SLOTH, "summary: high", "summary: '{{ if true }}x'", "slos[0].alerting.annotations.summary", "unexpected EOF"),
    (SLOTH, "summary: high", "summary: '{{ nofunc }}'", "slos[0].alerting.annotations.summary", '"nofunc" not defined'),
    (SLOTH, "summary: high", "summary: '{{ $nolabel }}'", "slos[0].alerting.annotations.summary", "undefined variable"),
    # llmpath: the owner is a label of every alert; the SLO's static labels are labels of its absent alert.
    (LLMPATH, "    stage: prefill\n", "    stage: prefill\n    owner: 'a\"}{{'\n", "slos[0].owner", "unclosed action"),
    (
        _edit(LLMPATH, "service: llm-api\n", "service: llm-api\nlabels:\n  team: '{{x'\n"),
        "      threshold_alert:\n",
        "      absent_alert: {}\n      threshold_alert:\n",
        "labels.team",
        "unclosed action",
    ),
]


@pytest.mark.parametrize(
    ("base", "old", "new", "field", "reason"),
    TEMPLATE_CASES,
    ids=["label", "annotation-if", "annotation-func", "annotation-var", "owner", "static-label-absent"],
)
def test_alert_labels_and_annotations_must_be_prometheus_templates(tmp_path, base, old, new, field, reason):
    _assert_rejected(tmp_path, _edit(base, old, new), field, reason)


def test_valid_templates_and_template_free_labels_compile_and_pass_promtool(tmp_path, require_binary):
    require_binary("promtool")
    summary = (
        "summary: '{{ $labels.sloth_id }} at {{ $value | humanizePercentage }}{{/* c */}}"
        '{{ range $k, $v := $labels }}{{ if eq $k "x" }}{{ break }}{{ else }}{{ $v }}{{ end }}{{ end }}'
        "{{- with $externalURL }} {{ . }}{{ end -}}'"
    )
    # Without an absent alert the SLO's labels stay on recording rules, where Prometheus reads no template.
    text = _edit(LLMPATH, "service: llm-api\n", "service: llm-api\nlabels:\n  team: '{{x'\n")
    text = _edit(
        text,
        "        long_window: 10m\n",
        "        long_window: 10m\n        annotations:\n          " + summary + "\n",
    )
    spec = _spec(tmp_path, text)
    code, output = _cli("slo", "compile", spec, "-o", tmp_path / "rules")
    assert code == 0, output
    check = _promtool("check", "rules", tmp_path / "rules" / "slos.yaml")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "{{ break }}" in (tmp_path / "rules" / "slos.yaml").read_text()


def test_an_extra_label_that_is_no_template_is_named_on_the_alert(tmp_path):
    """--extra-label values reach the absent alert's labels: caught after the rules are generated."""
    spec = _spec(
        tmp_path, _edit(LLMPATH, "      threshold_alert:\n", "      absent_alert: {}\n      threshold_alert:\n")
    )
    code, output = _cli("slo", "compile", spec, "-o", tmp_path / "rules", "-l", "env={{prod")
    assert code == 1 and not (tmp_path / "rules").exists()
    assert "alert TTFTBurnNoData: label 'env' is not a valid Prometheus template: unclosed action" in output


# (template, parses in Prometheus 2.42): promtool's own verdict is checked by the test below.
TEMPLATES = [
    ("plain text }} with braces", True),
    ('{{ $labels.route | urlquery }} {{ printf "%.2f" $value }}', True),
    ('{{ range query "up" }}{{ .Labels.instance }}{{ end }}', True),
    ('{{ with query "x" }}{{ . | first | value | humanize }}{{ end }}', True),
    ("{{ if gt $value 1.0 }}a{{ else if lt $value 0.0 }}b{{ else }}c{{ end }}", True),
    ('{{ define "x" }}a{{ end }}{{ template "x" . }}', True),
    ("{{ $x := $labels }}{{ $x.route }}{{ $x = 2 }}", True),
    ('{{ "a}}b" }}{{ `c}}` }}{{ 1e3 }}{{ -1.5 }}{{ 0x1F }}', True),
    ("{{- /* a comment */ -}}{{/* another */}}", True),
    ('{{ stripPort "a:1" }}{{ parseDuration "1m" }}{{ toTime 1 }}', True),
    ('{{ (index $labels "a") }}{{ nil }}', True),
    ("a {{ b", False),
    ('{{ "unterminated }}', False),
    ("{{/* unclosed comment", False),
    ("{{ /* a comment must follow the braces */ }}", False),
    ("{{ }}", False),
    ("{{ end }}", False),
    ("{{ else }}", False),
    ("{{ if true }}", False),
    ("{{ if true }}{{ else }}{{ else }}{{ end }}", False),
    ("{{ if true }}{{ else with 1 }}{{ end }}", False),
    ("{{ break }}", False),
    ("{{ toDuration 1 }}", False),
    ("{{ $undefined }}", False),
    ("{{ humanize (1 }}", False),
    ("{{ humanize 1) }}", False),
    ("{{ ( ) }}", False),
    ("{{ | printf }}", False),
    ("{{{{ x }}", False),
    ("{{ @ }}", False),
]


def test_template_check_agrees_with_promtool(tmp_path, require_binary):
    require_binary("promtool")
    for text, parses in TEMPLATES:
        assert (prometheus_template_error(text) is None) == parses, text
    groups = [
        {"name": f"g{i}", "rules": [{"alert": f"A{i}", "expr": "vector(1)", "annotations": {"x": text}}]}
        for i, (text, _) in enumerate(TEMPLATES)
    ]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    check = _promtool("check", "rules", tmp_path / "rules.yaml")
    refused = {i for i in range(len(TEMPLATES)) if f'"A{i}": annotation "x": template:' in check.stdout + check.stderr}
    assert refused == {i for i, (_, parses) in enumerate(TEMPLATES) if not parses}


# The PromQL parser knows Prometheus 3; the rules are for Prometheus 2.42. These compiled with exit 0 into rules
# that promtool 2.42 rejects (or, for the result types, into an SLI division that cannot be evaluated).
TOTAL = "sum(rate(http_requests_total[{{.window}}]))"
PROMQL_CASES = [
    ("http_requests_total[{{.window}}]", "returns a range vector"),
    ('"{{.window}}"', "the duration 1m as a number needs Prometheus 3"),  # YAML-quoted: the query is `{{.window}}`
    ("sum(rate(http_requests_total[{{.window}}])) / 1m", "the duration 1m as a number needs Prometheus 3"),
    ('sum(rate({"http.requests_total"}[{{.window}}]))', 'the quoted name "http.requests_total" needs Prometheus 3'),
    ("limitk(1, rate(http_requests_total[{{.window}}]))", "aggregation limitk needs Prometheus 3"),
    ('sort_by_label(rate(http_requests_total[{{.window}}]), "a")', "function sort_by_label() needs Prometheus 3"),
    ("sum(double_exponential_smoothing(x[{{.window}}], 0.5, 0.5))", "double_exponential_smoothing() (holt_winters()"),
]


@pytest.mark.parametrize(("query", "reason"), PROMQL_CASES, ids=[r.split(" needs")[0] for _, r in PROMQL_CASES])
def test_queries_prometheus_2_cannot_evaluate_are_rejected(tmp_path, query, reason):
    text = _edit(SLOTH, f"total_query: {TOTAL}", f"total_query: {query}")
    _assert_rejected(tmp_path, text, "slos[0].sli.events.total_query", reason)


def test_prometheus_2_syntax_that_prometheus_3_renamed_or_extended_compiles(tmp_path, require_binary):
    """holt_winters() (Prometheus 3's double_exponential_smoothing) was rejected as an unknown function; a negative
    offset, durations in ranges, subqueries and comments mentioning durations are valid PromQL 2."""
    require_binary("promtool")
    total = "sum(holt_winters(http_requests_total[{{.window}}] offset -5m, 0.5, 0.5)) # over 1h30m"
    error = 'sum(rate(http_requests_total{code=~"5.."}[{{.window}}:1m] @ start()))'
    text = _edit(
        _edit(SLOTH, f"total_query: {TOTAL}", f"total_query: '{total}'"),
        'error_query: sum(rate(http_requests_total{code=~"5.."}[{{.window}}]))',
        f"error_query: '{error}'",
    )
    spec = _spec(tmp_path, text)
    code, output = _cli("slo", "compile", spec, "-o", tmp_path / "rules")
    assert code == 0, output
    check = _promtool("check", "rules", tmp_path / "rules" / "slos.yaml")
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_query_ending_in_a_comment_keeps_its_closing_parenthesis(tmp_path, require_binary):
    """The rules write `(<query>)` on one line: a quoted query ending in `# comment` commented out the `)` and
    promtool rejected every SLI rule ("unclosed left parenthesis"), yet compile exited 0."""
    require_binary("promtool")
    text = _edit(SLOTH, f"total_query: {TOTAL}", f"total_query: '{TOTAL} # all requests'")
    spec = _spec(tmp_path, text)
    code, output = _cli("slo", "compile", spec, "-o", tmp_path / "rules")
    assert code == 0, output
    check = _promtool("check", "rules", tmp_path / "rules" / "slos.yaml")
    assert check.returncode == 0, check.stdout + check.stderr
    # Queries without a comment are written exactly as Sloth writes them.
    code, plain = _cli("slo", "compile", _spec(tmp_path, SLOTH), "-o", "-")
    assert yaml.safe_load(plain)["groups"][0]["rules"][0]["expr"].endswith("\n(sum(rate(http_requests_total[5m])))\n")


@pytest.mark.parametrize(
    "selector",
    [
        'llmpath_requests_total{code=~"5.."} # server errors',
        'llmpath_requests_total{code=~"5.."} offset 5m',
        'llmpath_requests_total{code=~"5.."} @ 100',
    ],
    ids=["comment", "offset", "at"],
)
def test_ratio_selectors_must_be_plain(tmp_path, selector):
    """The compiler writes a ratio selector into `rate(<selector>[<window>])`: a comment swallowed the rest, and
    `offset`/`@` before the range does not parse; all three compiled with exit 0."""
    text = _edit(
        LLMPATH,
        "      latency:\n        histogram: llmpath_time_to_first_token_seconds\n        threshold: 0.5\n",
        f"      ratio:\n        bad: '{selector}'\n        total: llmpath_requests_total\n",
    )
    _assert_rejected(tmp_path, text, "slos[0].sli.ratio.bad", "must be a plain series selector")


@pytest.mark.slow
def test_a_100_percent_objective_gets_promtool_tests_that_pass(tmp_path, require_binary):
    """An objective of 100 is valid (0 < x <= 100) but has no error budget: compile --tests died with
    ZeroDivisionError. Its scenarios now make a share of the events bad, and every alert fires on any error."""
    require_binary("promtool")
    spec = _spec(tmp_path, _edit(SLOTH, "objective: 99.9", "objective: 100"))
    code, output = _cli("slo", "compile", spec, "-o", tmp_path / "rules", "--tests")
    assert code == 0, output
    test_file = tmp_path / "rules" / "tests" / "svc-availability.test.yaml"
    header = test_file.read_text().splitlines()[:8]
    assert any("fast burn (0.2 of the events bad; a 100% objective has no error budget)" in h for h in header)
    run = _promtool("test", "rules", test_file.name, cwd=test_file.parent)
    assert run.returncode == 0, run.stdout + run.stderr


def test_compile_never_writes_over_its_input_spec(tmp_path):
    """`-o slos.yaml` for the input slos.yaml, or the input folder as -o, replaced the spec with its rules."""
    spec = _spec(tmp_path, SLOTH)
    code, output = _cli("slo", "compile", spec, "-o", spec)
    assert code == 2 and _flat("is an input spec; writing the rules there would replace it") in _flat(output)
    code, output = _cli("slo", "compile", tmp_path, "-o", tmp_path, "--tests")
    assert code == 2 and _flat(f"{spec} is an input spec") in _flat(output)
    assert spec.read_text() == SLOTH and sorted(p.name for p in tmp_path.iterdir()) == ["slos.yaml"]


def test_an_output_path_that_cannot_be_written_is_an_error_not_a_traceback(tmp_path):
    spec = _spec(tmp_path, SLOTH)
    (tmp_path / "afile").write_text("not a folder\n")
    code, output = _cli("slo", "compile", spec, "-o", tmp_path / "afile" / "rules")
    assert code == 1 and "cannot write" in output and f"nothing was written to {tmp_path / 'afile' / 'rules'}" in output
    code, output = _cli("slo", "init", tmp_path / "afile" / "slos.yaml")
    assert code == 1 and "cannot write" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "slos.yaml"]


@pytest.mark.parametrize("in_the_way", ["file", "folder"])
def test_an_output_folder_with_something_in_the_way_is_left_as_it_was(tmp_path, in_the_way):
    """``-o out --tests`` where ``out/tests`` is a file (or ``out/<spec>.yaml`` a folder): the rules were renamed into
    place before the tests failed, though the CLI said nothing was written."""
    spec = _spec(tmp_path, SLOTH)
    out = tmp_path / "out"
    out.mkdir()
    if in_the_way == "file":
        (out / "tests").write_text("not a folder\n")
    else:
        (out / spec.name).mkdir()
    code, output = _cli("slo", "compile", spec, "-o", out, "--tests")
    assert code == 1 and "cannot write" in output and f"nothing was written to {out}" in output
    assert sorted(p.name for p in out.iterdir()) == (["tests"] if in_the_way == "file" else [spec.name])


def test_a_byte_order_mark_is_read_like_any_utf8_file(tmp_path):
    """A spec saved with a UTF-8 BOM (as some Windows editors write it) was 'unknown spec version
    'prometheus/v1'' (a supported version); a windows file with one was not an AlertWindows catalog."""
    spec = tmp_path / "slos.yaml"
    spec.write_text("\ufeff" + SLOTH, encoding="utf-8")
    windows = tmp_path / "windows.yaml"
    windows.write_text("\ufeff" + (Path(__file__).parents[2] / "slo/examples/windows-1h.yaml").read_text())
    code, output = _cli("slo", "compile", spec, "-o", tmp_path / "rules", "--windows", windows)
    assert code == 0, output
    assert "sloth_window: 1h" in (tmp_path / "rules" / "slos.yaml").read_text()


def test_a_windows_file_that_is_not_utf8_is_an_error_not_a_traceback(tmp_path):
    spec = _spec(tmp_path, SLOTH)
    (tmp_path / "windows.yaml").write_bytes(b"apiVersion: sloth.slok.dev/v1\nkind: AlertWindows\n\xff\xfe\n")
    code, output = _cli("slo", "compile", spec, "-o", tmp_path / "rules", "--windows", tmp_path / "windows.yaml")
    assert code == 1 and f"{tmp_path / 'windows.yaml'}: the windows file is not a UTF-8 text file" in output
    assert not (tmp_path / "rules").exists()


# --------------------------------------------------------------------------------------------
# Type mutations: every field of a valid spec replaced by a value of another type. Each must compile or raise
# SpecError naming that field's path; never another exception.
# --------------------------------------------------------------------------------------------

WRONG_VALUES = [None, ["x"], {"a": "b"}, "", 0, -1, True, 1.5, float("nan"), float("inf"), "é✓\u200b", "a{{b"]


def _paths(node: object, path: tuple = ()) -> list[tuple]:
    out = [path] if path else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, (*path, i))
    return out


def _field(path: tuple) -> str:
    """A mutated path as the CLI names fields: ``slos[0].sli.events``."""
    return "".join(f"[{key}]" if isinstance(key, int) else f".{key}" for key in path).lstrip(".")


def _mutated(data: dict, path: tuple, value: object) -> dict:
    out = copy.deepcopy(data)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = copy.deepcopy(value)
    return out


@pytest.mark.parametrize("base", [SLOTH, LLMPATH], ids=["sloth", "llmpath"])
def test_every_field_with_a_wrong_type_compiles_or_names_the_field(tmp_path, base):
    data = yaml.safe_load(base)
    outcomes = {"compiled": 0, "rejected": 0}
    for path in _paths(data):
        for value in WRONG_VALUES:
            spec = tmp_path / "slos.yaml"
            spec.write_text(yaml.safe_dump(_mutated(data, path, value), allow_unicode=True))
            try:
                compile_slos(load_specs([spec]), CompileOptions(tests=False))
            except SpecError as exc:
                outcomes["rejected"] += 1
                assert exc.issues and all(i.file == str(spec) and i.message for i in exc.issues), (path, value)
                # The problem is named in the mutated SLO (at the field, or at one its value made impossible,
                # such as an alert an objective of 1.5 can never fire), or at a field above it left without a
                # value (a list of SLOs that is a string has no slos[0].sli): never in another SLO or elsewhere.
                scope = _field(path[:2]) if len(path) > 1 and isinstance(path[1], int) else _field(path[:1])
                assert any(
                    i.field in (None, "spec", "version")
                    or (i.field or "").startswith(scope)
                    or scope.startswith(i.field or "-")
                    for i in exc.issues
                ), (
                    path,
                    value,
                    [str(i) for i in exc.issues],
                )
            else:
                outcomes["compiled"] += 1
    assert outcomes["rejected"] > outcomes["compiled"] > 0


@pytest.mark.parametrize(
    "query",
    [
        'sum(rate(http_requests_total{window="{{.window}}"}[5m]))',
        "|\n          sum(rate(http_requests_total[5m])) # per {{.window}}",
    ],
    ids=["in-a-label-value", "in-a-comment"],
)
def test_a_window_variable_only_in_a_string_or_comment_is_rejected(tmp_path, query):
    """Sloth's check (the query contains {{.window}}) passed, yet every window's SLI was the same 5m rate: the
    multi-window alerts compiled with exit 0 and meant nothing."""
    text = _edit(SLOTH, f"total_query: {TOTAL}", f"total_query: {query}")
    _assert_rejected(tmp_path, text, "slos[0].sli.events.total_query", "only in a string or comment")


@pytest.mark.slow
def test_a_100_percent_objective_per_route_gets_promtool_tests_that_pass(tmp_path, require_binary):
    """With a zero budget the healthy route's period budget remaining is 0/0 = NaN, which promtool 2.42 cannot
    match (it compares with ==): the generated test failed until such a check was left out."""
    require_binary("promtool")
    text = _edit(
        _edit(LLMPATH, "objective: 95", "objective: 100\n    period_rule: ratio_of_counts"),
        "      threshold_alert:\n        name: TTFTSlow\n        severity: page\n        factor: 10\n"
        "        short_window: 2m\n        long_window: 10m\n",
        "",
    )
    spec = _spec(tmp_path, text)
    code, output = _cli("slo", "compile", spec, "-o", tmp_path / "rules", "--tests", "--period", "7d")
    assert code == 0, output
    test_file = tmp_path / "rules" / "tests" / "llm-api-ttft.test.yaml"
    assert "NaN" not in test_file.read_text()
    run = _promtool("test", "rules", test_file.name, cwd=test_file.parent)
    assert run.returncode == 0, run.stdout + run.stderr
