"""Real promtool (Prometheus 2.42): every generated rule file passes ``check rules``, and the generated
``test rules`` files pass for the default spec (30d and the 1-hour example catalog) and Sloth's inputs."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from llmpath.slo import CompileOptions, compile_slos, default_spec_path, load_specs

REPO = Path(__file__).resolve().parents[2]
SHORT_WINDOWS = REPO / "slo" / "examples" / "windows-1h.yaml"
TESTDATA = "test/integration/prometheus/testdata"

# Sloth outputs promtool 2.42 rejects by design (SOURCE.md): UTF-8 label names from a plugin, and MetricsQL.
NOT_PROMQL_242 = {"contrib-slo-plugins.yml", "victoria-metrics.yml"}


def _write(out: Path, files: dict[str, str]) -> list[Path]:
    paths = []
    for name, text in files.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        paths.append(path)
    return paths


def _promtool(promtool: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *map(str, args)], capture_output=True, text=True, timeout=300)


def _run_tests(promtool: str, files: list[Path]) -> None:
    """Run promtool test files two at a time (the CI machine has two cores); all must pass."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda f: (f, _promtool(promtool, "test", "rules", f)), files))
    failures = [f"{f.name}:\n{r.stdout[-3000:]}{r.stderr[-2000:]}" for f, r in results if r.returncode != 0]
    assert not failures, "\n\n".join(failures)


def test_default_spec_rules_pass_promtool_check(tmp_path, require_binary):
    promtool = require_binary("promtool")
    result = compile_slos(load_specs([default_spec_path()]))
    (rule_file,) = _write(tmp_path, result.files)
    check = _promtool(promtool, "check", "rules", rule_file)
    assert check.returncode == 0, check.stdout + check.stderr
    n_rules = sum(len(g["rules"]) for g in yaml.safe_load(rule_file.read_text())["groups"])
    assert f"SUCCESS: {n_rules} rules found" in check.stdout


def test_every_sloth_output_passes_promtool_check(tmp_path, require_binary, sloth_dir, sloth_plugins):
    promtool = require_binary("promtool")
    inputs = sorted((sloth_dir / TESTDATA).glob("in-*.yaml")) + sorted((sloth_dir / "examples").glob("*.y*ml"))
    inputs = [p for p in inputs if p.name not in NOT_PROMQL_242 and "invalid" not in p.name]
    checked = []
    for i, source in enumerate(inputs):
        options = CompileOptions(format="prometheus", sli_plugins=sloth_plugins[0], slo_plugins=sloth_plugins[1])
        result = compile_slos(load_specs([source]), options)
        checked += _write(tmp_path / str(i), result.files)
    check = _promtool(promtool, "check", "rules", *checked)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count("SUCCESS") == len(checked) >= 20


def test_utf8_plugin_labels_are_flagged_for_prometheus_2(sloth_dir, sloth_plugins):
    # Sloth accepts UTF-8 label names from plugin configuration; Prometheus 2.42 rejects them: we warn.
    result = compile_slos(
        load_specs([sloth_dir / "examples" / "contrib-slo-plugins.yml"]),
        CompileOptions(sli_plugins=sloth_plugins[0], slo_plugins=sloth_plugins[1]),
    )
    assert any("plug-l1" in w.message and "Prometheus 2" in w.message for w in result.warnings)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("period", "windows", "only"),
    [
        (None, None, None),
        (None, SHORT_WINDOWS, None),
        # 7 days: the page-slow factor (3.5x) is below 4x, so the slow burn must be chosen lower (2.45x).
        ("7d", None, {"llm-api-ttft.test.yaml", "llm-api-prompt-cache-hit-rate.test.yaml"}),
    ],
    ids=["30d", "1h-example", "7d"],
)
def test_default_spec_generated_promtool_tests_pass(tmp_path, require_binary, period, windows, only):
    promtool = require_binary("promtool")
    options = CompileOptions(period=period, windows_file=windows, tests=True)
    result = compile_slos(load_specs([default_spec_path()]), options)
    _write(tmp_path, result.files)
    tests = _write(tmp_path / "tests", result.test_files)
    assert {p.name for p in tests} == {f"{s.id}.test.yaml" for s in result.slos}
    _run_tests(promtool, [t for t in tests if only is None or t.name in only])


@pytest.mark.slow
def test_sloth_inputs_generated_promtool_tests_pass(tmp_path, require_binary, sloth_dir, sloth_plugins):
    promtool = require_binary("promtool")
    sources = [
        sloth_dir / TESTDATA / "in-base.yaml",
        sloth_dir / TESTDATA / "in-multifile.yaml",
        sloth_dir / TESTDATA / "in-openslo.yaml",
        sloth_dir / TESTDATA / "in-base-k8s.yaml",
        sloth_dir / "examples" / "kubernetes-apiserver.yml",
        sloth_dir / "examples" / "home-wifi.yml",
        sloth_dir / "examples" / "plugin-getting-started.yml",
    ]
    tests: list[Path] = []
    for i, source in enumerate(sources):
        options = CompileOptions(
            format="prometheus", tests=True, sli_plugins=sloth_plugins[0], slo_plugins=sloth_plugins[1]
        )
        result = compile_slos(load_specs([source]), options)
        _write(tmp_path / str(i), result.files)
        tests += _write(tmp_path / str(i) / "tests", result.test_files)
    assert len(tests) == 14  # one per SLO
    _run_tests(promtool, tests)
