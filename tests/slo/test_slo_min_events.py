"""``alerting.min_events`` (llmpath/v1): burn-rate and threshold alerts need that many events in a pair's long window,
so that one failed request on a quiet route does not page. Checked with real promtool runs of the compiled rules."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from llmpath.slo import CompileOptions, SpecError, compile_slos, load_specs

SPEC = """\
version: llmpath/v1
service: svc
slos:
  - name: availability
    objective: 99.9
    group_by: [route]
    period_rule: ratio_of_counts
    sli:
      ratio:
        bad: llmpath_requests_total{{code=~"5.."}}
        total: llmpath_requests_total
    alerting:
      name: SvcAvailability
{guard}"""


def _compile(tmp_path: Path, guard: str, tests: bool = False):
    path = tmp_path / "svc.yaml"
    path.write_text(SPEC.format(guard=guard))
    return compile_slos(load_specs([path]), CompileOptions(tests=tests))


def _alerts(result) -> dict[tuple[str, str], dict]:
    (text,) = result.files.values()
    rules = [r for g in yaml.safe_load(text)["groups"] for r in g["rules"]]
    return {(r["alert"], r["labels"]["sloth_severity"]): r for r in rules if "alert" in r}


def test_every_pair_of_every_alert_checks_its_long_windows_event_count(tmp_path: Path) -> None:
    result = _compile(tmp_path, "      min_events: 20\n")
    (text,) = result.files.values()
    records = {r["record"] for g in yaml.safe_load(text)["groups"] for r in g["rules"] if "record" in r}
    assert {f"slo:sli_total_events:rate{w}" for w in ("5m", "1h", "6h", "1d", "3d")} <= records
    period = next(r for g in yaml.safe_load(text)["groups"] for r in g["rules"] if r.get("record", "").endswith("30d"))
    assert "sum_over_time(slo:sli_error_events:rate5m" in period["expr"]  # still the count-based period SLI
    page = _alerts(result)[("SvcAvailability", "page")]
    assert page["expr"].count(" >= 20) without (sloth_window)") == 2  # the 1h/5m and 6h/30m pairs
    assert 'slo:sli_total_events:rate1h{sloth_id="svc-availability"' in page["expr"] and "* 3600 >= 20" in page["expr"]
    assert "* 21600 >= 20" in page["expr"]
    assert "(with at least 20 events in the long window)" in page["annotations"]["description"]
    unguarded = _alerts(_compile(tmp_path, ""))[("SvcAvailability", "page")]
    assert "sli_total_events" not in unguarded["expr"]


@pytest.mark.parametrize(
    ("guard", "message"),
    [
        ("      min_events: 0\n", "greater than or equal to 1"),
        ("      min_events: many\n", "min_events"),
    ],
)
def test_a_bad_min_events_names_the_field(tmp_path: Path, guard: str, message: str) -> None:
    with pytest.raises(SpecError) as err:
        _compile(tmp_path, guard)
    assert any("min_events" in (i.field or "") and message in str(i) for i in err.value.issues), err.value.issues


def test_min_events_needs_an_event_count(tmp_path: Path) -> None:
    path = tmp_path / "raw.yaml"
    path.write_text(
        SPEC.format(guard="      min_events: 5\n")
        .replace(
            """      ratio:
        bad: llmpath_requests_total{code=~"5.."}
        total: llmpath_requests_total
""",
            """      raw:
        error_ratio_query: sum(rate(errors_total[{{.window}}])) / sum(rate(requests_total[{{.window}}]))
""",
        )
        .replace("    group_by: [route]\n    period_rule: ratio_of_counts\n", "")
    )
    with pytest.raises(SpecError) as err:
        compile_slos(load_specs([path]))
    assert any("min_events needs an events, latency or ratio SLI" in str(i) for i in err.value.issues)


def _quiet_route_test(rule_file: str, alert: str) -> dict:
    """A route with 6 requests an hour for 3 hours, one of them a 5xx at 2h05m; the page's verdict at 2h10m."""
    return {
        "rule_files": [rule_file],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": 'llmpath_requests_total{route="quiet",code="200"}', "values": "0+0.1x180"},
                    {"series": 'llmpath_requests_total{route="quiet",code="500"}', "values": "0x124 1x56"},
                ],
                "alert_rule_test": [{"eval_time": "130m", "alertname": alert, "exp_alerts": []}],
            }
        ],
    }


@pytest.mark.parametrize("guarded", [True, False])
def test_one_error_on_a_quiet_route_pages_only_without_min_events(tmp_path: Path, require_binary, guarded) -> None:
    promtool = require_binary("promtool")
    result = _compile(tmp_path, "      min_events: 20\n" if guarded else "")
    ((name, text),) = result.files.items()
    (tmp_path / name).write_text(text)
    test = _quiet_route_test(name, "SvcAvailability")
    (tmp_path / "quiet.test.yaml").write_text(yaml.safe_dump(test))
    run = subprocess.run([promtool, "test", "rules", "quiet.test.yaml"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    if guarded:  # 6 events in the last hour < 20: no verdict on a 1-in-6 error ratio
        assert run.returncode == 0, run.stdout + run.stderr
    else:  # 1/6 > 14.4 x 0.1%: both pages and tickets fire (what the expectation of no alert says is wrong)
        assert run.returncode == 1 and 'sloth_severity="page"' in run.stdout + run.stderr, run.stdout + run.stderr


def test_generated_promtool_tests_model_the_guard(tmp_path: Path, require_binary) -> None:
    promtool = require_binary("promtool")
    result = _compile(tmp_path, "      min_events: 20\n", tests=True)
    for name, text in {**result.files, **{f"tests/{k}": v for k, v in result.test_files.items()}}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (test_file,) = (tmp_path / "tests").glob("*.test.yaml")
    run = subprocess.run([promtool, "test", "rules", str(test_file)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


def test_the_runbook_states_the_minimum(tmp_path: Path) -> None:
    from llmpath.runbooks import build_runbooks

    result = _compile(tmp_path, "      min_events: 20\n")
    pages = build_runbooks(result.slos)
    assert "the long window holds at least **20 events**" in pages["SvcAvailability-page.md"]
    assert "min_events" not in build_runbooks(_compile(tmp_path, "").slos)["SvcAvailability-page.md"]
