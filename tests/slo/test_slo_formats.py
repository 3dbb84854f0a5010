"""Go-compatible number/duration formatting, the yaml.v2-style emitter, Go templates and window catalogs."""

from __future__ import annotations

from typing import Literal

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from llmpath.slo import CompileOptions, SpecError, compile_slos, load_specs
from llmpath.slo.errors import IssueLog
from llmpath.slo.gofmt import (
    format_duration,
    go_duration,
    go_float,
    go_float_fixed,
    go_sorted,
    parse_duration,
    prom_filter,
)
from llmpath.slo.gotemplate import TemplateError, render_window
from llmpath.slo.windows import BUILTIN_WINDOWS, load_windows_file
from llmpath.slo.yamlout import dump

GO_G = [
    (0.9990000000000001, "0.9990000000000001"),
    (30.0, "30"),
    (6.0, "6"),
    (5.6000000000000005, "5.6000000000000005"),
    (0.0009999999999999432, "0.0009999999999999432"),
    (1e-05, "1e-05"),
    (0.0001, "0.0001"),
    (123456.0, "123456"),
    (1e6, "1e+06"),
    (1234567.0, "1.234567e+06"),
    (-2.5, "-2.5"),
    (0.0, "0"),
    (1e21, "1e+21"),
]


@pytest.mark.parametrize(("value", "text"), GO_G)
def test_go_float_formatting(value, text):
    assert go_float(value) == text


def test_go_fixed_formatting():
    assert [go_float_fixed(v) for v in (99.9, 1e-05, 1e21, 95.0)] == ["99.9", "0.00001", "1000000000000000000000", "95"]


@pytest.mark.parametrize(
    ("text", "ms", "canonical"),
    [
        ("30d", 30 * 86_400_000, "30d"),
        ("28d", 28 * 86_400_000, "4w"),
        ("7d", 7 * 86_400_000, "1w"),
        ("90m", 5_400_000, "1h30m"),
        ("36h", 129_600_000, "1d12h"),
        ("1y", 365 * 86_400_000, "1y"),
        ("1500ms", 1500, "1s500ms"),
    ],
)
def test_prometheus_durations(text, ms, canonical):
    assert parse_duration(text) == ms
    assert format_duration(ms) == canonical


@pytest.mark.parametrize("bad", ["", "5", "1h5", "5M", "-1h", "1.5h", "h"])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_go_duration_and_filters():
    assert go_duration(parse_duration("7d")) == "168h0m0s"
    assert go_duration(90_000) == "1m30s"
    assert prom_filter({"sloth_slo": "a", "sloth_id": 'x"y'}) == '{sloth_id="x\\"y", sloth_slo="a"}'


def test_yaml_v2_key_order():
    keys = ["k10", "k2", "k1", "plugin", "plug-l1", "sloth_id", "a_b", "a0b", "ab", "B"]
    assert list(go_sorted(dict.fromkeys(keys, ""))) == [
        "B",
        "a_b",
        "a0b",
        "ab",
        "k1",
        "k2",
        "k10",
        "plug-l1",
        "plugin",
        "sloth_id",
    ]


def test_emitter_quotes_and_folds_like_yaml_v2():
    doc = {
        "labels": {"tier": "2", "objective": "99.9", "flag": "true", "on": "yes", "empty": "", "plain": "valhalla"},
        "expr": '1 - slo:period_burn_rate:ratio{sloth_id="svc01-slo1", sloth_service="svc01", sloth_slo="slo1"}',
        "summary": "{{$labels.sloth_service}} {{$labels.sloth_slo}} SLO error budget burn rate is over expected.",
        "multi": "(a)\n/\n(b)\n",
        "strip": "x\ny",
    }
    assert dump(doc) == (
        'labels:\n  tier: "2"\n  objective: "99.9"\n  flag: "true"\n  "on": "yes"\n  empty: ""\n  plain: valhalla\n'
        'expr: 1 - slo:period_burn_rate:ratio{sloth_id="svc01-slo1", sloth_service="svc01",\n'
        '  sloth_slo="slo1"}\n'
        "summary: '{{$labels.sloth_service}} {{$labels.sloth_slo}} SLO error budget burn rate\n"
        "  is over expected.'\n"
        "multi: |\n  (a)\n  /\n  (b)\n"
        "strip: |-\n  x\n  y\n"
    )


_SURROGATES: tuple[Literal["Cs"]] = ("Cs",)
_text = st.text(alphabet=st.characters(blacklist_categories=_SURROGATES), max_size=120)
_keys = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_keys, _text, max_size=6), _text, st.lists(_text, max_size=3))
@example(labels={"a": " x", "b": "x ", "c": "- x", "d": "#x", "e": "\n"}, expr="=", items=["A\n", "a\n\n", " \nx", "'"])
@example(labels={"0": "\n"}, expr="0b_", items=[])
def test_emitter_round_trips_any_string(labels, expr, items):
    doc = {"groups": [{"name": "g", "rules": [{"record": "r", "expr": expr, "labels": labels}]}], "items": items}
    if not items:
        del doc["items"]
    assert yaml.safe_load(dump(doc)) == doc


def test_go_template_subset():
    assert render_window("rate(x[{{.window}}]) {{ .window }}", "5m") == "rate(x[5m]) 5m"
    assert render_window('{{"{{.window}}"}} {{- /* note */ -}} x', "1h") == "{{.window}}x"
    for bad, message in (
        ("[{{.foo}}]", 'no entry for key "foo"'),
        ('{{ printf "x" }}', "unsupported"),
        ("{{.window", "unclosed"),
    ):
        with pytest.raises(TemplateError, match=message):
            render_window(bad, "1m")


def test_builtin_catalog_factors_match_sloth():
    factors = {
        w.period: [round(b.factor, 12) for s in ("page", "ticket") for b in w.burn_windows(s)]
        for w in BUILTIN_WINDOWS.values()
    }
    assert factors == {
        "30d": [14.4, 6.0, 3.0, 1.0],
        "4w": [13.44, 5.6, 2.8, 0.933333333333],
        "1w": [13.44, 3.5, 1.4, 0.98],
    }


def test_windows_file_validation(tmp_path):
    good = tmp_path / "w.yaml"
    good.write_text(
        "apiVersion: sloth.slok.dev/v1\nkind: AlertWindows\nspec:\n  sloPeriod: 2h\n"
        + "".join(
            f"  {sev}:\n"
            + "".join(
                f"    {speed}:\n      errorBudgetPercent: 50\n      shortWindow: {short}\n      longWindow: {long}\n"
                for speed, short, long in pairs
            )
            for sev, pairs in (
                ("page", [("quick", "1m", "5m"), ("slow", "2m", "10m")]),
                ("ticket", [("quick", "5m", "30m"), ("slow", "10m", "1h")]),
            )
        )
    )
    log = IssueLog()
    (windows,) = load_windows_file(good, log)
    assert not log.errors and windows.period == "2h" and windows.alert_windows_ms()[0] == 60_000
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("longWindow: 1h", "longWindow: 2h"))
    log = IssueLog()
    assert load_windows_file(bad, log) == []
    assert "must be shorter than the SLO period (2h)" in log.errors[0].message


def test_a_windows_file_sets_the_default_period(tmp_path, sloth_dir):
    spec = sloth_dir / "test/integration/prometheus/testdata/in-base.yaml"
    seven = sloth_dir / "test/integration/prometheus/windows/7d.yaml"
    result = compile_slos(load_specs([spec]), CompileOptions(windows_file=seven))
    assert {s.period for s in result.slos} == {"1w"}
    with pytest.raises(SpecError, match="not a valid duration"):
        compile_slos(load_specs([spec]), CompileOptions(period="thirty days"))
