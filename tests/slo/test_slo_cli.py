"""`llmpath slo compile/validate/init` through a real subprocess."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from llmpath.live.promapi import PrometheusClient
from llmpath.slo import CompileOptions, compile_slos, default_spec_path, load_specs
from tests.loopback import Answer, Loopback, Request

TESTDATA = "test/integration/prometheus/testdata"
REPO = Path(__file__).resolve().parents[2]


def _run(llmpath_bin: str, *args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([llmpath_bin, "slo", *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_init_writes_the_default_spec_and_refuses_to_overwrite(tmp_path, llmpath_bin):
    proc = _run(llmpath_bin, "init", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    written = tmp_path / "slos.yaml"
    default = default_spec_path().read_text()
    # The header's commands name the file written, not the packaged llm-api.yaml; the rest is the default spec.
    expected = default.replace("slo compile llm-api.yaml ", "slo compile slos.yaml ").replace(
        "slo validate llm-api.yaml ", "slo validate slos.yaml "
    )
    assert expected != default and written.read_text() == expected
    assert "# Compile:   llmpath slo compile slos.yaml -o rules/" in expected
    assert "llm-api.yaml" not in written.read_text()
    assert "llmpath slo compile slos.yaml" in proc.stderr
    written.write_text("# my edits\n")
    proc = _run(llmpath_bin, "init", cwd=tmp_path)
    assert proc.returncode == 1 and "already exists" in proc.stderr
    assert written.read_text() == "# my edits\n"
    assert _run(llmpath_bin, "init", "--force", cwd=tmp_path).returncode == 0
    assert written.read_text() == expected
    elsewhere = _run(llmpath_bin, "init", tmp_path / "specs" / "api.yaml")
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert f"llmpath slo validate {tmp_path / 'specs' / 'api.yaml'} [" in (tmp_path / "specs" / "api.yaml").read_text()
    stdout = _run(llmpath_bin, "init", "-")
    assert stdout.returncode == 0 and stdout.stdout == default


def test_compile_default_spec_with_tests(tmp_path, llmpath_bin):
    proc = _run(llmpath_bin, "compile", default_spec_path(), "-o", tmp_path / "rules", "--tests")
    assert proc.returncode == 0, proc.stderr
    expected = compile_slos(load_specs([default_spec_path()]), CompileOptions(tests=True))
    rules = tmp_path / "rules"
    assert sorted(p.relative_to(rules).as_posix() for p in rules.rglob("*") if p.is_file()) == sorted(
        ["llm-api.yaml", *(f"tests/{name}" for name in expected.test_files)]
    )
    assert (rules / "llm-api.yaml").read_text() == expected.files["llm-api.yaml"]
    test_file = yaml.safe_load((rules / "tests" / "llm-api-ttft.test.yaml").read_text())
    assert test_file["rule_files"] == ["../llm-api.yaml"]
    assert "compiled 7 SLOs into 1 rule file(s) and 7 promtool test file(s)" in proc.stderr
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(rules.stat().st_mode) == 0o777 & ~umask  # a new folder gets the usual permissions
    # Recompiling into the existing folder replaces the files and leaves no staging folder behind.
    (rules / "llm-api.yaml").write_text("stale\n")
    (rules / "mine.txt").write_text("kept\n")
    assert _run(llmpath_bin, "compile", default_spec_path(), "-o", rules).returncode == 0
    assert (rules / "llm-api.yaml").read_text() == expected.files["llm-api.yaml"]
    assert (rules / "mine.txt").read_text() == "kept\n"
    assert not list(tmp_path.rglob(".*tmp*"))


def test_compile_to_stdout_matches_sloth(sloth_dir, llmpath_bin):
    proc = _run(llmpath_bin, "compile", sloth_dir / TESTDATA / "in-base.yaml", "-o", "-")
    assert proc.returncode == 0, proc.stderr
    expected = (sloth_dir / TESTDATA / "out-base.yaml.tpl").read_text()
    got_docs = yaml.safe_load(proc.stdout)
    exp_docs = yaml.safe_load(expected.replace('{{"', "").replace('"}}', "").replace("{{ .version }}", "x"))
    for group in got_docs["groups"]:
        for rule in group["rules"]:
            rule.get("labels", {}).pop("sloth_version", None)
    for group in exp_docs["groups"]:
        for rule in group["rules"]:
            rule.get("labels", {}).pop("sloth_version", None)
    assert got_docs == exp_docs


def test_compile_to_a_single_file_and_format_operator(tmp_path, llmpath_bin):
    target = tmp_path / "deploy" / "slos.yaml"
    proc = _run(llmpath_bin, "compile", default_spec_path(), "-o", target, "--format", "prometheus-operator")
    assert proc.returncode == 0, proc.stderr
    assert f"compiled 7 SLOs into {target}" in proc.stderr  # a file, not a folder ("into 1 rule file(s) under")
    doc = yaml.safe_load(target.read_text())
    assert doc["kind"] == "PrometheusRule" and doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["metadata"] == {
        "labels": {"app.kubernetes.io/component": "SLO", "app.kubernetes.io/managed-by": "llmpath"},
        "name": "llm-api",
    }
    assert len(doc["spec"]["groups"]) == 21  # 3 per SLO


def test_folder_inputs_keep_relative_paths_and_number_documents(tmp_path, llmpath_bin, sloth_dir):
    specs = tmp_path / "specs"
    (specs / "team-a").mkdir(parents=True)
    (specs / "team-a" / "multi.yaml").write_text((sloth_dir / TESTDATA / "in-multifile.yaml").read_text())
    (specs / "openslo.yaml").write_text((sloth_dir / TESTDATA / "in-openslo.yaml").read_text())
    (specs / "notes.yaml").write_text("just: a config file\n")
    proc = _run(llmpath_bin, "compile", specs, "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    out = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.yaml"))
    assert out == ["openslo.yaml", "team-a/multi-1.yaml", "team-a/multi-2.yaml"]
    assert "notes.yaml" in proc.stderr and "skipped: not an SLO spec" in proc.stderr


def test_extra_labels_windows_and_plugins(tmp_path, llmpath_bin, sloth_dir, sloth_plugins_file):
    proc = _run(
        llmpath_bin,
        "compile",
        sloth_dir / TESTDATA / "in-sli-plugin.yaml",
        "-o",
        tmp_path / "out",
        "--plugins",
        sloth_plugins_file,
        "-l",
        "env=prod",
        "--windows",
        REPO / "slo" / "examples" / "windows-1h.yaml",
    )
    assert proc.returncode == 0, proc.stderr
    doc = yaml.safe_load((tmp_path / "out" / "in-sli-plugin.yaml").read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert all(r["labels"]["env"] == "prod" for r in rules)
    assert {r["record"] for r in rules} >= {"slo:sli_error:ratio_rate1m", "slo:sli_error:ratio_rate1h"}
    assert 'integration_test{ guybrush="threepwood",melee="island",job="svc01"' in rules[0]["expr"]
    missing = _run(llmpath_bin, "compile", sloth_dir / TESTDATA / "in-sli-plugin.yaml", "-o", tmp_path / "o2")
    assert missing.returncode == 1 and "SLI plugin 'integration_test' not found" in missing.stderr


def test_validate_ok(llmpath_bin, sloth_dir):
    proc = _run(llmpath_bin, "validate", default_spec_path(), sloth_dir / TESTDATA / "in-base-k8s.yaml")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "OK: 9 SLOs in 2 file(s) are valid."


def test_help_lists_the_commands(llmpath_bin):
    proc = _run(llmpath_bin, "--help")
    assert proc.returncode == 0
    for command in ("compile", "validate", "init", "status"):
        assert command in proc.stdout


def test_status_says_when_prometheus_cannot_be_read(llmpath_bin, free_port):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = _run(llmpath_bin, "status", "--prometheus", url)
    assert proc.returncode == 2
    assert f"cannot read SLOs from Prometheus at {url}: ConnectError" in proc.stderr


def _not_prometheus(request: Request) -> Answer:
    """A web server that is not Prometheus (a 404 page), or one that answers with Prometheus's error JSON."""
    if request.path.startswith("/bad/"):
        status, kind, body = 400, "application/json", b'{"status":"error","errorType":"bad_data","error":"no"}'
    else:
        status, kind, body = 404, "text/html", b"<html>Not Found</html>"
    return Answer(status, body, {"content-type": kind})


def test_status_says_when_the_url_is_not_prometheus_or_prometheus_refuses():
    with Loopback(_not_prometheus) as server:
        not_prometheus = r"/api/v1/query: HTTP 404, not a Prometheus API response"
        with PrometheusClient(server.url) as client, pytest.raises(RuntimeError, match=not_prometheus):
            client.query("up")
        refused = r"/bad/api/v1/alerts: HTTP 400, bad_data: no"
        with PrometheusClient(server.url + "/bad") as client, pytest.raises(RuntimeError, match=refused):
            client.alerts()


def test_tests_of_specs_in_subfolders_find_their_rule_files(tmp_path, llmpath_bin, sloth_dir, require_binary):
    """OUT/tests/x.test.yaml refers to OUT/sub/x.yml as ../sub/x.yml, and promtool runs it from OUT/tests."""
    promtool = require_binary("promtool")
    (tmp_path / "specs" / "sub").mkdir(parents=True)
    (tmp_path / "specs" / "sub" / "getting-started.yml").write_text(
        (sloth_dir / "examples" / "getting-started.yml").read_text()
    )
    proc = _run(llmpath_bin, "compile", tmp_path / "specs", "-o", tmp_path / "out", "--tests")
    assert proc.returncode == 0, proc.stderr
    tests = tmp_path / "out" / "tests"
    (name,) = [p.name for p in tests.iterdir()]
    assert name == "myservice-requests-availability.test.yaml"
    assert yaml.safe_load((tests / name).read_text())["rule_files"] == ["../sub/getting-started.yml"]
    run = subprocess.run([promtool, "test", "rules", name], capture_output=True, text=True, timeout=300, cwd=tests)
    assert run.returncode == 0 and "SUCCESS" in run.stdout, run.stdout + run.stderr


def test_ignore_duplicates_keeps_one_test_file_per_slo(tmp_path, llmpath_bin, sloth_dir, require_binary):
    """The same SLO ID in two files (--ignore-duplicates): each gets its own test file, named by its rule file."""
    promtool = require_binary("promtool")
    source = (sloth_dir / "examples" / "getting-started.yml").read_text()
    (tmp_path / "specs" / "eu").mkdir(parents=True)
    (tmp_path / "specs" / "us.yml").write_text(source)
    (tmp_path / "specs" / "eu" / "main.yml").write_text(source.replace("objective: 99.9", "objective: 99.5"))
    (tmp_path / "specs" / "other.yml").write_text(source.replace('service: "myservice"', 'service: "other"'))
    proc = _run(llmpath_bin, "compile", tmp_path / "specs", "-o", tmp_path / "out", "--tests", "--ignore-duplicates")
    assert proc.returncode == 0, proc.stderr
    assert "compiled 3 SLOs into 3 rule file(s) and 3 promtool test file(s)" in proc.stderr
    tests = tmp_path / "out" / "tests"
    names = sorted(p.name for p in tests.iterdir())
    assert names == [
        "eu-main-myservice-requests-availability.test.yaml",
        "other-requests-availability.test.yaml",
        "us-myservice-requests-availability.test.yaml",
    ]
    rule_files = {name: yaml.safe_load((tests / name).read_text())["rule_files"] for name in names}
    assert rule_files == {
        names[0]: ["../eu/main.yml"],
        names[1]: ["../other.yml"],
        names[2]: ["../us.yml"],
    }
    assert (
        "# Run: promtool test rules eu-main-myservice-requests-availability.test.yaml" in (tests / names[0]).read_text()
    )
    for name in names:
        run = subprocess.run([promtool, "test", "rules", name], capture_output=True, text=True, timeout=300, cwd=tests)
        assert run.returncode == 0, run.stdout + run.stderr
