"""Claims of docs/slo.md that SREs rely on, checked against what the compiler really writes (and against promtool
where the claim is about what Prometheus does with it): the default spec's table, threshold-alert windows, alert
labels and descriptions, validation messages, exit codes, and how `le` bounds are matched."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from llmpath.slo import CompiledSLO, CompileOptions, SpecError, compile_slos, load_specs
from llmpath.slo.promtool_tests import render_template
from llmpath.slo.rules import le_regex

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "slo.md"
WINDOWS_1H = REPO / "slo" / "examples" / "windows-1h.yaml"

LATENCY = """\
version: llmpath/v1
service: llm-api
slos:
  - name: ttft
    objective: 95
    stage: prefill
    sli:
      latency:
        histogram: llmpath_time_to_first_token_seconds
        threshold: 0.45
    alerting:
      name: TTFTBurn
"""

SLOTH = """\
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


def _doc_section(heading: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    return text[text.index(heading) :]


def _doc_table(heading: str) -> list[list[str]]:
    """The rows (header and separator left out) of the first Markdown table after ``heading``."""
    rows: list[list[str]] = []
    for line in _doc_section(heading).splitlines()[1:]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    return rows[2:]


def _compile(tmp_path: Path, text: str, **options):
    path = tmp_path / "slos.yaml"
    path.write_text(text)
    return compile_slos(load_specs([path]), CompileOptions(**options))


def _alert_words(slo: CompiledSLO) -> list[str]:
    """The doc table's words for an SLO's alerts: page, ticket, no data, threshold page|ticket."""
    words = {"burn_rate": "{severity}", "absent": "no data", "threshold": "threshold {severity}"}
    return [words[a.kind].format(severity=a.severity) for a in slo.alerts]


def test_the_absent_alert_routes_like_the_other_alerts(tmp_path: Path, require_binary) -> None:
    """`labels:` are "on every rule" and `--extra-label` is "added to every rule": the burn-rate alerts get them
    from their series, but absent() keeps only the selector's labels, so the absent alert must carry them itself
    (an Alertmanager route on `team` would otherwise miss the no-data alert). Checked with promtool: no data at
    all, and the no-data alert that fires has the team and env labels."""
    promtool = require_binary("promtool")
    spec = LATENCY.replace("0.45", "0.5").replace("service: llm-api\n", "service: llm-api\nlabels: {team: inference}\n")
    spec += "      absent_alert:\n        labels: {severity: warning}\n"
    result = _compile(tmp_path, spec, extra_labels={"env": "prod"})
    ((name, text),) = result.files.items()
    (tmp_path / name).write_text(text)
    (absent,) = [a for a in result.slos[0].alerts if a.kind == "absent"]
    labels = {
        "sloth_id": "llm-api-ttft",
        "sloth_service": "llm-api",
        "sloth_slo": "ttft",
        "sloth_severity": "ticket",
        "severity": "warning",
        "stage": "prefill",
        "owner": "serving",
        "team": "inference",
        "env": "prod",
    }
    test = {
        "rule_files": [name],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [],
                "alert_rule_test": [
                    {
                        "eval_time": "15m",  # absent for its default `for` (2 x 5m)
                        "alertname": "TTFTBurnNoData",
                        "exp_alerts": [
                            {
                                "exp_labels": labels,
                                "exp_annotations": {
                                    k: render_template(v, labels) for k, v in absent.annotations.items()
                                },
                            }
                        ],
                    }
                ],
            }
        ],
    }
    (tmp_path / "absent.test.yaml").write_text(yaml.safe_dump(test))
    run = subprocess.run([promtool, "test", "rules", "absent.test.yaml"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize(
    ("threshold", "spellings", "others"),
    [
        (0.5, ["0.5", "0.50"], ["0.05", "5e-01"]),
        (1.0, ["1", "1.0"], ["10", "1e+00"]),
        (0.00005, ["5e-05", "0.00005"], ["5e-5", "0.0005", "5e-050"]),  # Go, Python and Prometheus 3 write 5e-05
        (0.0001, ["0.0001"], ["1e-04"]),  # from 1e-4 up every client writes the digits
        (2.5e-05, ["2.5e-05", "0.000025"], ["2.5e-5", "25e-06"]),
    ],
)
def test_the_le_matcher_accepts_every_clients_spelling(threshold: float, spellings: list[str], others: list[str]):
    pattern = le_regex(threshold)
    assert [s for s in spellings if not re.fullmatch(pattern, s)] == []
    assert [s for s in others if re.fullmatch(pattern, s)] == []


def test_a_sub_100_microsecond_bound_matches_the_exponent_spelling_in_prometheus(
    tmp_path: Path, require_binary
) -> None:
    """A Go or Python client writes the bound 0.00005 as le="5e-05": the SLI must see those buckets (before, the
    bucket selector matched nothing and the SLI had no data at all); the generated tests use both spellings."""
    promtool = require_binary("promtool")
    spec = LATENCY.replace("0.45", "0.00005").replace(
        "    stage: prefill\n", "    stage: auth\n    group_by: [route]\n"
    )
    spec = spec.replace("llmpath_time_to_first_token_seconds", "llmpath_stage_duration_seconds")
    spec = spec.replace("  - name: ttft\n", "  - name: auth\n")
    spec = spec.replace("        threshold: 0.00005\n", "        threshold: 0.00005\n        selector: {stage: auth}\n")
    buckets = {"llmpath_stage_duration_seconds": (0.00005, 0.0001, 0.001)}
    result = _compile(tmp_path, spec, histogram_buckets=buckets, tests=True)
    ((name, text),) = result.files.items()
    (tmp_path / name).write_text(text)
    ids = 'route="chat",sloth_id="llm-api-auth",sloth_service="llm-api",sloth_slo="auth",sloth_window="5m"'
    test = {
        "rule_files": [name],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [  # 10 requests a minute, half of them within the bound
                    {
                        "series": 'llmpath_stage_duration_seconds_bucket{stage="auth",route="chat",le="5e-05"}',
                        "values": "0+5x10",
                    },
                    {"series": 'llmpath_stage_duration_seconds_count{stage="auth",route="chat"}', "values": "0+10x10"},
                ],
                "promql_expr_test": [
                    {
                        "expr": "slo:sli_error:ratio_rate5m",
                        "eval_time": "10m",
                        "exp_samples": [{"labels": f"slo:sli_error:ratio_rate5m{{{ids}}}", "value": 0.5}],
                    }
                ],
            }
        ],
    }
    (tmp_path / "le.test.yaml").write_text(yaml.safe_dump(test))
    (tmp_path / "tests").mkdir()
    ((test_name, generated),) = result.test_files.items()
    (tmp_path / "tests" / test_name).write_text(generated)
    assert 'le="0.00005",route="r1"' in generated and 'le="5e-05",route="r2"' in generated
    for cwd, file in ((tmp_path, "le.test.yaml"), (tmp_path / "tests", test_name)):
        run = subprocess.run([promtool, "test", "rules", file], cwd=cwd, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


def test_the_doc_spec_error_example_is_the_real_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    block = _doc_section("`SpecError.issues` lists every problem")
    example = re.search(r"^```\n(.*?)^```", block, re.S | re.M)
    assert example is not None
    (tmp_path / "slos.yaml").write_text(LATENCY)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError) as err:
        compile_slos(load_specs(["slos.yaml"]))
    (issue,) = err.value.issues
    assert str(issue) == " ".join(example.group(1).split())


@pytest.mark.parametrize(
    ("args", "status", "says"),
    [
        (["--period", "thirty"], 1, "--period: not a valid duration"),
        (["--period", "14d"], 1, "the 336h0m0s SLO period time window is not supported"),
        (["--windows", "missing.yaml"], 1, "windows file not found"),
        (["--disable-alerts", "--disable-recordings"], 1, "leave nothing to generate"),
        (["-l", "bad-name=x"], 1, "invalid extra label 'bad-name'"),
        (["multi.yaml", "-o", "one.yaml"], 1, "2 output documents need an output folder"),
        (["-l", "novalue"], 2, "KEY=VALUE"),
        (["--plugins", "missing.py"], 2, "plugin file 'missing.py' not found"),
        (["--nope"], 2, "No such option"),
    ],
)
def test_compile_exit_status_for_option_problems(
    tmp_path: Path, llmpath_bin: str, args: list[str], status: int, says: str
) -> None:
    (tmp_path / "slos.yaml").write_text(SLOTH)
    (tmp_path / "multi.yaml").write_text(SLOTH + "---\n" + SLOTH.replace("service: svc", "service: other"))
    default = [] if "-o" in args else ["slos.yaml", "-o", "out"]
    run = subprocess.run([llmpath_bin, "slo", "compile", *default, *args], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == status, run.stderr
    assert says in " ".join(run.stderr.split())
    assert not (tmp_path / "out").exists() and not (tmp_path / "one.yaml").exists()
