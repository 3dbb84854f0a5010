"""Claims of docs/slo.md that SREs rely on, checked against what the compiler really writes (and against promtool
where the claim is about what Prometheus does with it): the default spec's table, threshold-alert windows, alert
labels and descriptions, validation messages, exit codes, and how `le` bounds are matched."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from llmpath.slo import CompiledSLO, CompileOptions, SpecError, compile_slos, default_spec_path, load_specs
from llmpath.slo.gofmt import parse_duration
from llmpath.slo.promtool_tests import render_template
from llmpath.slo.rules import le_regex
from llmpath.slo.windows import BUILTIN_WINDOWS, WindowCatalog
from tests.slo.test_slo_bad_input import GOOD
from tests.slo.test_slo_bad_input import SLOTH_GOOD as SLOTH

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "slo.md"
WINDOWS_1H = REPO / "slo" / "examples" / "windows-1h.yaml"


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


# --------------------------------------------------------------------------------------------
# The default LLM API spec.
# --------------------------------------------------------------------------------------------


def test_the_default_spec_is_what_the_docs_table_says() -> None:
    rows = _doc_table("### The default LLM API spec")
    slos = {s.name: s for s in compile_slos(load_specs([default_spec_path()])).slos}
    assert [row[0] for row in rows] == list(slos)
    for name, sli, objective, owned, alerts in rows:
        slo = slos[name]
        assert f"{slo.objective:g}%" == objective, name
        assert f"{slo.stage} ({slo.owner})" == owned, name
        assert _alert_words(slo) == alerts.split(", "), name
        selectors = re.findall(r"`([^`]*)`", sli)
        if slo.sli.kind == "latency":
            (selector,) = selectors
            metric, _, matchers = selector.partition("{")
            assert metric == slo.sli.histogram, name
            assert dict(re.findall(r'(\w+)="([^"]*)"', matchers)) == dict(slo.sli.selector), name
            value, unit = re.findall(r"≤ ([\d.]+) (ms|s)\b", sli)[0]
            assert float(value) / (1000 if unit == "ms" else 1) == slo.sli.threshold, name
        elif "5xx / all" in sli:  # availability: bad 5xx requests among all
            assert slo.sli.bad == f'{selectors[0]}{{code=~"5.."}}' and slo.sli.total == selectors[0], name
        else:  # good / total: the total's matchers are written alone
            good, total = selectors
            assert slo.sli.good == good and slo.sli.total == good.split("{")[0] + total, name


@pytest.mark.parametrize(
    ("period", "windows", "cache_pair"),
    [
        ("30d", None, ("6h", "3d")),
        ("28d", None, ("6h", "3d")),
        ("7d", None, ("6h", "3d")),
        (None, WINDOWS_1H, ("10m", "30m")),
    ],
)
def test_threshold_alerts_keep_their_windows_and_the_cache_ticket_uses_the_ticket_slow_pair(
    period: str | None, windows: Path | None, cache_pair: tuple[str, str]
) -> None:
    """The TTFT and TPOT pages (half the requests slow over 10m and 2m) do not scale with the period; the cache
    ticket, with no windows given, uses the catalog's ticket-slow pair."""
    result = compile_slos(load_specs([default_spec_path()]), CompileOptions(period=period, windows_file=windows))
    threshold = {a.name: (a.severity, a.windows) for s in result.slos for a in s.alerts if a.kind == "threshold"}
    assert set(threshold) == {
        "LLMAPITTFTMostlySlow",
        "LLMAPITimePerOutputTokenMostlySlow",
        "LLMAPIPromptCacheHitRateLow",
    }
    for name in ("LLMAPITTFTMostlySlow", "LLMAPITimePerOutputTokenMostlySlow"):
        severity, (pair,) = threshold[name]
        assert (severity, pair.short, pair.long) == ("page", "2m", "10m")
        assert pair.factor * 0.05 == pytest.approx(0.5)  # half of the requests slow, at a 95% objective
    severity, (pair,) = threshold["LLMAPIPromptCacheHitRateLow"]
    assert (severity, pair.short, pair.long, pair.factor) == ("ticket", *cache_pair, 1.0)
    catalog = WindowCatalog.from_paths([windows] if windows else []).get(parse_duration(result.slos[0].period))
    assert catalog is not None
    ticket_slow = catalog.burn_windows("ticket")[1]
    assert (pair.short, pair.long) == (ticket_slow.short, ticket_slow.long)


# --------------------------------------------------------------------------------------------
# Window catalogs.
# --------------------------------------------------------------------------------------------


def test_builtin_catalogs_spend_the_documented_budget_shares() -> None:
    """30d and 28d: 2% in 1h, 5% in 6h, 10% in 1d, 10% in 3d; 7d: 8%, 12.5%, 20%, 42% (same windows)."""
    shares = {
        w.period: [(b.short, b.long, b.budget_percent) for sev in ("page", "ticket") for b in w.burn_windows(sev)]
        for w in BUILTIN_WINDOWS.values()
    }
    google = [("5m", "1h", 2.0), ("30m", "6h", 5.0), ("2h", "1d", 10.0), ("6h", "3d", 10.0)]
    assert shares == {
        "30d": google,
        "4w": google,
        "1w": [("5m", "1h", 8.0), ("30m", "6h", 12.5), ("2h", "1d", 20.0), ("6h", "3d", 42.0)],
    }


def test_the_one_hour_example_catalog_has_the_documented_factors() -> None:
    """slo/examples/windows-1h.yaml: page 7.2x over 5m/1m and 4.8x over 10m/2m; ticket 1.8x and 1x."""
    (windows,) = WindowCatalog.from_paths([WINDOWS_1H]).user
    pairs = [(b.short, b.long, round(b.factor, 9)) for sev in ("page", "ticket") for b in windows.burn_windows(sev)]
    assert windows.period == "1h"
    assert pairs == [("1m", "5m", 7.2), ("2m", "10m", 4.8), ("5m", "20m", 1.8), ("10m", "30m", 1.0)]


# --------------------------------------------------------------------------------------------
# Generated rules: sloth_slo_info, descriptions, labels.
# --------------------------------------------------------------------------------------------


def test_slo_info_names_the_llmpath_version_spec_and_mode() -> None:
    (text,) = compile_slos(load_specs([default_spec_path()])).files.values()
    rules = [r for g in yaml.safe_load(text)["groups"] for r in g["rules"]]
    info = next(r for r in rules if r.get("record") == "sloth_slo_info" and r["labels"]["sloth_slo"] == "ttft")
    assert info["labels"] == {
        "owner": "serving",
        "sloth_id": "llm-api-ttft",
        "sloth_mode": "cli-gen-llmpath",
        "sloth_objective": "95",
        "sloth_service": "llm-api",
        "sloth_slo": "ttft",
        "sloth_spec": "llmpath/v1",
        "sloth_version": f"llmpath-{importlib.metadata.version('llmpath-slo')}",
        "stage": "prefill",
    }


def test_burn_rate_descriptions_give_windows_factors_and_time_to_exhaustion() -> None:
    slo = next(s for s in compile_slos(load_specs([default_spec_path()])).slos if s.name == "availability")
    page, ticket = (a.annotations["description"] for a in slo.alerts[:2])
    who = "{{$labels.sloth_service}} {{$labels.sloth_slo}} (stage route, owner platform)"
    assert page == (
        f"{who} is burning its 99.9% / 30d error budget at more than 14.4x the sustainable rate over both 1h and "
        "5m, or 6x over both 6h and 30m. At 14.4x the whole budget lasts about 2.1 days."
    )
    assert ticket == (
        f"{who} is burning its 99.9% / 30d error budget at more than 3x the sustainable rate over both 1d and 2h, "
        "or 1x over both 3d and 6h. At 3x the whole budget lasts about 10.0 days."
    )


def test_scalars_are_read_with_gos_rules_in_every_format(tmp_path: Path) -> None:
    """A label value true, 2 or 0.2 is the string "true", "2", "0.2" (prometheus/v1 and llmpath/v1)."""
    for text in (SLOTH, GOOD):
        labelled = text.replace("slos:\n", "labels: {a: true, b: 2, c: 0.2}\nslos:\n", 1)
        (slo,) = _compile(tmp_path, labelled).slos
        assert {k: slo.labels[k] for k in "abc"} == {"a": "true", "b": "2", "c": "0.2"}


def test_the_absent_alert_routes_like_the_other_alerts(tmp_path: Path, require_binary) -> None:
    """`labels:` are "on every rule" and `--extra-label` is "added to every rule": the burn-rate alerts get them
    from their series, but absent() keeps only the selector's labels, so the absent alert must carry them itself
    (an Alertmanager route on `team` would otherwise miss the no-data alert). Checked with promtool: no data at
    all, and the no-data alert that fires has the team and env labels."""
    promtool = require_binary("promtool")
    spec = GOOD.replace("service: llm-api\n", "service: llm-api\nlabels: {team: inference}\n")
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


# --------------------------------------------------------------------------------------------
# Latency SLIs: every spelling of the bound.
# --------------------------------------------------------------------------------------------


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
    spec = GOOD.replace("threshold: 0.5", "threshold: 0.00005").replace(
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


# --------------------------------------------------------------------------------------------
# Validation.
# --------------------------------------------------------------------------------------------


def test_the_doc_spec_error_example_is_the_real_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    block = _doc_section("`SpecError.issues` lists every problem")
    example = re.search(r"^```\n(.*?)^```", block, re.S | re.M)
    assert example is not None
    (tmp_path / "slos.yaml").write_text(GOOD.replace("threshold: 0.5", "threshold: 0.45"))  # not a bucket bound
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError) as err:
        compile_slos(load_specs(["slos.yaml"]))
    (issue,) = err.value.issues
    assert str(issue) == " ".join(example.group(1).split())


def test_an_unreachable_threshold_alert_names_the_largest_factor_that_can_fire(tmp_path: Path) -> None:
    spec = """\
version: llmpath/v1
service: svc
slos:
  - name: cache
    objective: 50
    sli:
      ratio:
        good: llmpath_tokens_total{type="cached"}
        total: llmpath_tokens_total{type="input"}
    alerting:
      page_alert: {disable: true}
      ticket_alert: {disable: true}
      threshold_alert:
        name: CacheLow
        factor: 3
"""
    with pytest.raises(SpecError) as err:
        _compile(tmp_path, spec)
    (issue,) = err.value.issues
    assert issue.field == "slos[0].alerting.threshold_alert"
    assert "the alert can never fire; use a factor below 2 or an objective of at least 66.667%" in issue.message


def test_an_unreachable_alert_is_a_warning_for_sloth_inputs(tmp_path: Path) -> None:
    """Sloth accepts it (a warning, an error with --strict); the same SLO as llmpath/v1 is an error."""
    result = _compile(tmp_path, SLOTH.replace("99.9", "50"))
    (page,) = [w for w in result.warnings if w.field == "slos[0].alerting.page_alert"]
    assert "the page alert can never fire with a 50% objective" in page.message
    # threshold_alert is an llmpath/v1 key: a Sloth input is told which format has it
    assert page.message.endswith("or disable the alert and add a threshold_alert (a `version: llmpath/v1` spec)")
    with pytest.raises(SpecError):
        _compile(tmp_path, SLOTH.replace("99.9", "50"), strict=True)
    llmpath = SLOTH.replace('"prometheus/v1"', "llmpath/v1").replace("99.9", "50")
    with pytest.raises(SpecError, match="the page alert can never fire") as err:
        _compile(tmp_path, llmpath)
    assert str(err.value.issues[0].message).endswith("or disable the alert and add a threshold_alert")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("service: llm-api\n", "service: llm-api\nlabels: {route: x}\n"), "'route' is also a static label"),
        (("    stage: prefill\n", "    stage: prefill\n    labels: {route: x}\n"), "'route' is also a static label"),
        (("group_by: [route]", "group_by: [le]"), "invalid grouping label 'le'"),
        (("group_by: [route]", "group_by: [sloth_id]"), "invalid grouping label 'sloth_id'"),
    ],
)
def test_group_by_conflicts_are_errors(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    base = GOOD.replace("    stage: prefill\n", "    stage: prefill\n    group_by: [route]\n")
    assert edit[0] in base
    with pytest.raises(SpecError) as err:
        _compile(tmp_path, base.replace(*edit))
    assert any(i.field == "slos[0].group_by" and message in i.message for i in err.value.issues), err.value.issues


def test_group_by_needs_a_latency_or_ratio_sli(tmp_path: Path) -> None:
    events = SLOTH.replace('"prometheus/v1"', "llmpath/v1").replace("    sli:\n", "    group_by: [route]\n    sli:\n")
    with pytest.raises(SpecError, match="group_by works with latency and ratio SLIs"):
        _compile(tmp_path, events)


def test_a_duplicate_key_in_a_sloth_spec_keeps_the_last_value(tmp_path: Path) -> None:
    result = _compile(tmp_path, SLOTH.replace("objective: 99.9\n", "objective: 99\n    objective: 99.9\n"))
    assert result.slos[0].objective == 99.9
    (warning,) = result.warnings
    assert "duplicate key 'objective' (first at line 5): Sloth uses the last value" in warning.message


def test_a_folder_input_skips_window_catalogs_silently_and_other_files_with_a_warning(tmp_path: Path) -> None:
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "slos.yaml").write_text(SLOTH)
    (specs / "windows.yaml").write_text(WINDOWS_1H.read_text())
    (specs / "rules.yaml").write_text("groups:\n  - name: g\n    rules: []\n")
    (specs / "config.yaml").write_text("scrape_interval: 1m\n")
    result = compile_slos(load_specs([specs]))
    assert list(result.files) == ["slos.yaml"] and result.slos[0].period == "30d"
    assert sorted((Path(w.file or "").name, w.message) for w in result.warnings) == [
        ("config.yaml", "skipped: not an SLO spec"),
        ("rules.yaml", "skipped: a Prometheus rule file"),
    ]


# --------------------------------------------------------------------------------------------
# Exit status of `llmpath slo compile`.
# --------------------------------------------------------------------------------------------


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
