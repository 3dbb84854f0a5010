"""Claims of docs/slo.md that SREs rely on, checked against what the compiler really writes (and against promtool
where the claim is about what Prometheus does with it): the default spec's table, threshold-alert windows, alert
labels and descriptions, validation messages, exit codes, and how `le` bounds are matched."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from llmpath.slo import CompiledSLO, CompileOptions, compile_slos, load_specs
from llmpath.slo.promtool_tests import render_template

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
