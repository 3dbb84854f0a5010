"""Conformance with Sloth v0.16.0: every golden generate pair, the examples, and validate good/bad.

Comparison (issue 5): expected templates rendered, then parsed YAML equal and every ``expr`` string equal, ignoring
only the header comment and the ``sloth_version`` value. The output is also byte-identical apart from those two.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from llmpath.slo import CompileOptions, SpecError, compile_slos, load_specs

VERSION = "v-conformance"
TESTDATA = "test/integration/prometheus/testdata"
WINDOWS_7D = "test/integration/prometheus/windows/7d.yaml"

# (input, expected, compile options) — Sloth's generate_test.go table.
GENERATE_PAIRS = [
    ("in-base.yaml", "out-base.yaml.tpl", {}),
    ("in-base-k8s.yaml", "out-base-k8s.yaml.tpl", {}),
    ("in-base.yaml", "out-base-no-alerts.yaml.tpl", {"disable_alerts": True}),
    ("in-base.yaml", "out-base-no-recordings.yaml.tpl", {"disable_recordings": True}),
    ("in-base.yaml", "out-base-extra-labels.yaml.tpl", {"extra_labels": {"exk1": "exv1", "exk2": "exv2"}}),
    ("in-sli-plugin.yaml", "out-sli-plugin.yaml.tpl", {"plugins": True}),
    ("in-slo-plugin.yaml", "out-slo-plugin.yaml.tpl", {"plugins": True}),
    ("in-slo-plugin-k8s.yaml", "out-slo-plugin-k8s.yaml.tpl", {"plugins": True}),
    ("in-multifile.yaml", "out-multifile.yaml.tpl", {}),
    ("in-multifile-k8s.yaml", "out-multifile-k8s.yaml.tpl", {}),
    ("in-openslo.yaml", "out-openslo.yaml.tpl", {}),
    ("in-base.yaml", "out-base-28d.yaml.tpl", {"period": "28d"}),
    ("in-base.yaml", "out-base-custom-windows-7d.yaml.tpl", {"period": "7d", "windows": WINDOWS_7D}),
]

EXAMPLES = [
    "contrib-denominator-corrected.yaml",
    "contrib-slo-plugins.yml",
    "getting-started.yml",
    "home-wifi.yml",
    "k8s-getting-started.yml",
    "k8s-home-wifi.yml",
    "k8s-multifile.yml",
    "kubernetes-apiserver.yml",
    "multifile.yml",
    "no-alerts.yml",
    "openslo-getting-started.yml",
    "openslo-kubernetes-apiserver.yml",
    "plugin-getting-started.yml",
    "plugin-k8s-getting-started.yml",
    "raw-home-wifi.yml",
    "slo-plugin-getting-started.yml",
    "slo-plugin-k8s-getting-started.yml",
    "victoria-metrics.yml",
]


def render_expected(template: str, version: str) -> str:
    """Render Sloth's expected-output Go template (SOURCE.md): escaped alert templates, then the version."""
    return re.sub(r'\{\{"(.*?)"\}\}', r"\1", template).replace("{{ .version }}", version)


def _drop_version(node: object) -> object:
    if isinstance(node, dict):
        return {k: ("<version>" if k == "sloth_version" else _drop_version(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_drop_version(v) for v in node]
    return node


def _exprs(node: object) -> list[str]:
    if isinstance(node, dict):
        own = [node["expr"]] if "expr" in node else []
        return own + [e for v in node.values() for e in _exprs(v)]
    if isinstance(node, list):
        return [e for v in node for e in _exprs(v)]
    return []


def _without_comments_and_version(text: str) -> str:
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    return "\n".join(re.sub(r"sloth_version: .*", "sloth_version: <version>", line) for line in lines)


def assert_conforms(got: str, expected: str) -> None:
    got_docs = [_drop_version(d) for d in yaml.safe_load_all(got)]
    exp_docs = [_drop_version(d) for d in yaml.safe_load_all(expected)]
    assert _exprs(got_docs) == _exprs(exp_docs)
    assert got_docs == exp_docs
    assert _without_comments_and_version(got) == _without_comments_and_version(expected)


def _compile(path: Path, opts: dict, sloth_dir: Path, sloth_plugins: tuple[dict, dict]) -> str:
    sli, slo = sloth_plugins if opts.get("plugins") else ({}, {})
    options = CompileOptions(
        period=opts.get("period"),
        windows_file=sloth_dir / opts["windows"] if "windows" in opts else None,
        extra_labels=opts.get("extra_labels", {}),
        disable_alerts=opts.get("disable_alerts", False),
        disable_recordings=opts.get("disable_recordings", False),
        sli_plugins=sli,
        slo_plugins=slo,
        sloth_version=VERSION,
    )
    result = compile_slos(load_specs([path]), options)
    return "".join(result.files.values())


@pytest.mark.parametrize(
    ("source", "expected", "opts"), GENERATE_PAIRS, ids=[f"{a}->{b}" for a, b, _ in GENERATE_PAIRS]
)
def test_generate_pair_matches_sloth(source, expected, opts, sloth_dir, sloth_plugins):
    got = _compile(sloth_dir / TESTDATA / source, opts, sloth_dir, sloth_plugins)
    want = render_expected((sloth_dir / TESTDATA / expected).read_text(), VERSION)
    assert_conforms(got, want)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_matches_sloth_gen(name, sloth_dir, sloth_plugins):
    # scripts/examplesgen.sh: --extra-labels cmd=examplesgen.sh, version "dev", default 30d.
    opts = {"extra_labels": {"cmd": "examplesgen.sh"}, "plugins": True}
    got = _compile(sloth_dir / "examples" / name, opts, sloth_dir, sloth_plugins)
    want = (
        (sloth_dir / "examples" / "_gen" / name).read_text().replace("sloth_version: dev", f"sloth_version: {VERSION}")
    )
    assert_conforms(got, want)


def test_invalid_version_is_rejected(sloth_dir):
    with pytest.raises(SpecError) as err:
        load_specs([sloth_dir / TESTDATA / "in-invalid-version.yaml"])
    assert "prometheus/v999" in str(err.value)
    assert "in-invalid-version.yaml:1:1" in str(err.value)


def _validate(paths: list[Path]) -> None:
    compile_slos(load_specs(paths), CompileOptions())


def test_validate_good_files_pass(sloth_dir):
    good = sorted((sloth_dir / TESTDATA / "validate" / "good").iterdir())
    assert len(good) == 7
    # Sloth validates this folder with --ignore-slo-duplicates (the good files repeat the same SLO IDs).
    result = compile_slos(
        load_specs([sloth_dir / TESTDATA / "validate" / "good"]), CompileOptions(ignore_duplicates=True)
    )
    assert len({s.source for s in result.slos}) == 7
    with pytest.raises(SpecError, match="already exists"):
        _validate([sloth_dir / TESTDATA / "validate" / "good"])


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("bad-aa.yaml", "objective must >0 and <=100"),
        ("bad-ab.yaml", "objective must >0 and <=100"),
        ("bad-ba.yaml", "objective must >0 and <=100"),
        ("bad-k8s.yaml", "invalid SLO service: required"),
        ("bad-multi.yaml", "at least one SLI type is required"),
        ("bad-multi-k8s.yaml", "alert name is required"),
    ],
)
def test_validate_bad_files_fail(name, message, sloth_dir):
    path = sloth_dir / TESTDATA / "validate" / "bad" / name
    with pytest.raises(SpecError) as err:
        _validate([path])
    assert message in str(err.value)
    # Each issue names its SLO, or is about the document (its service), then reported once, not once per SLO.
    assert all(issue.file == str(path) for issue in err.value.issues)
    assert all(issue.slo or issue.field == "spec.service" for issue in err.value.issues)
    assert len({str(issue) for issue in err.value.issues}) == len(err.value.issues)


def test_validate_bad_folder_fails(sloth_dir):
    with pytest.raises(SpecError):
        _validate([sloth_dir / TESTDATA / "validate" / "bad"])


def test_bad_openslo_28d_is_valid_with_the_builtin_28d_catalog(sloth_dir):
    # Marked BAD upstream before Sloth embedded a 28d catalog (SOURCE.md); a 28-day window is valid now.
    result = compile_slos(load_specs([sloth_dir / TESTDATA / "validate" / "bad" / "bad-openslo.yaml"]))
    assert result.slos[0].period == "4w"


@pytest.mark.parametrize(
    "inputs",
    [
        ["validate_with_duplicates/prom"],
        ["validate_with_duplicates/k8s"],
        ["validate_with_duplicates/openslo"],
        ["validate_with_duplicates/bad-prom-multi-duplicates.yaml"],
    ],
)
def test_duplicate_slo_ids_fail(inputs, sloth_dir):
    with pytest.raises(SpecError) as err:
        _validate([sloth_dir / TESTDATA / p for p in inputs])
    assert "already exists" in str(err.value) or "is repeated" in str(err.value)
