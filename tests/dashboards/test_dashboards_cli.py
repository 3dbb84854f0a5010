"""`llmpath dashboards build` and `llmpath runbooks build` as users run them (subprocess), including `--check` on the
artefacts committed in the repository."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = ("llmpath-api-path.json", "llmpath-backends.json", "llmpath-slos.json")


def _run(llmpath_bin: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([llmpath_bin, *args], capture_output=True, text=True, timeout=120, cwd=REPO)


@pytest.mark.parametrize(("part", "out"), [("dashboards", "dashboards/generated"), ("runbooks", "runbooks/generated")])
def test_committed_artefacts_are_fresh(llmpath_bin: str, part: str, out: str) -> None:
    """The generated files committed for the default spec match what the code generates now (`make regen`)."""
    result = _run(llmpath_bin, part, "build", "-o", out, "--check")
    assert result.returncode == 0, f"{result.stderr}\nrun `make regen` and commit the result"
    assert "up to date" in result.stdout


def test_dashboards_build_and_check_detect_every_kind_of_drift(llmpath_bin: str, tmp_path: Path) -> None:
    out = tmp_path / "dash"
    built = _run(llmpath_bin, "dashboards", "build", "-o", str(out))
    assert built.returncode == 0, built.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(DASHBOARDS)
    for name in DASHBOARDS:
        assert json.loads((out / name).read_text())["schemaVersion"] == 42
    assert _run(llmpath_bin, "dashboards", "build", "-o", str(out), "--check").returncode == 0

    api = out / "llmpath-api-path.json"
    api.write_text(api.read_text().replace('"schemaVersion": 42', '"schemaVersion": 41'))
    (out / "llmpath-backends.json").unlink()
    (out / "llmpath-old.json").write_text("{}")
    before = {p.name: p.read_text() for p in out.iterdir()}
    stale = _run(llmpath_bin, "dashboards", "build", "-o", str(out), "--check")
    assert stale.returncode == 1
    assert f"{api}: out of date" in stale.stderr
    assert f"{out / 'llmpath-backends.json'}: missing" in stale.stderr
    assert f"{out / 'llmpath-old.json'}: no longer generated" in stale.stderr
    assert "regenerate with: llmpath dashboards build" in stale.stderr
    assert {p.name: p.read_text() for p in out.iterdir()} == before  # --check writes nothing

    fixed = _run(llmpath_bin, "dashboards", "build", "-o", str(out))
    assert fixed.returncode == 0 and "2 written, 1 removed" in fixed.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(DASHBOARDS)


def test_runbook_base_url_links_each_burn_rate_panel_to_its_alerts_runbooks(llmpath_bin: str, tmp_path: Path) -> None:
    from llmpath.dashboards import burn_panel_id
    from llmpath.dashboards.specs import SpecOptions, compile_specs

    base = "https://runbooks.example.com/llm"
    built = _run(llmpath_bin, "dashboards", "build", "-o", str(tmp_path / "a"), "--runbook-base-url", base)
    assert built.returncode == 0, built.stderr
    slos_json = json.loads((tmp_path / "a" / "llmpath-slos.json").read_text())
    panels = {p["id"]: p for p in slos_json["panels"]}
    for slo in compile_specs(SpecOptions()).slos:
        links = panels[burn_panel_id(slo.id)]["links"]
        assert {link["url"] for link in links} == {f"{base}/{alert.runbook_file}" for alert in slo.alerts}, slo.id
        assert all(link["targetBlank"] and link["type"] == "link" for link in links)
    # Without it (or with a URL Grafana could not open) there are no links.
    plain = _run(llmpath_bin, "dashboards", "build", "-o", str(tmp_path / "b"))
    assert plain.returncode == 0, plain.stderr
    plain_json = json.loads((tmp_path / "b" / "llmpath-slos.json").read_text())
    assert not any(p.get("links") for p in plain_json["panels"])
    relative = _run(llmpath_bin, "dashboards", "build", "-o", str(tmp_path / "c"), "--runbook-base-url", "runbooks")
    assert relative.returncode == 2 and "absolute http(s) URL" in " ".join(relative.stderr.replace("│", " ").split())
    assert not (tmp_path / "c").exists()


def test_bad_spec_exits_1_like_slo_compile_naming_the_file_and_writes_nothing(llmpath_bin: str, tmp_path: Path) -> None:
    spec = tmp_path / "broken.yaml"
    spec.write_text("version: prometheus/v1\nservice: x\nslos:\n  - name: a\n    objective: 120\n")
    compiled = _run(llmpath_bin, "slo", "compile", str(spec), "-o", str(tmp_path / "rules"))
    assert compiled.returncode == 1
    for command in (["dashboards", "build", "-o"], ["runbooks", "build", "-o"], ["dashboards", "lint", "--slo"]):
        out = tmp_path / f"out-{command[0]}"
        args = [*command, str(out), "--slo", str(spec)]
        if command[1] == "lint":
            args = [*command, str(spec), str(REPO / "dashboards" / "generated" / DASHBOARDS[0])]
        result = _run(llmpath_bin, *args)
        assert result.returncode == compiled.returncode == 1, result.stdout + result.stderr
        # The same lines as `slo compile` prints, without its "nothing was written to OUT".
        assert result.stderr == compiled.stderr.replace(f"; nothing was written to {tmp_path / 'rules'}", "")
        assert f"{spec}:5:5: SLO 'x-a': slos[0].objective: objective must >0 and <=100 (got 120)" in result.stderr
        assert not out.exists()


def test_lint_takes_the_spec_options_build_was_given(llmpath_bin: str, tmp_path: Path) -> None:
    """Dashboards built with --windows (1-minute SLI windows) lint clean with the same options, not without."""
    windows = str(REPO / "slo" / "examples" / "windows-1h.yaml")
    out = tmp_path / "dash"
    built = _run(llmpath_bin, "dashboards", "build", "--windows", windows, "-o", str(out))
    assert built.returncode == 0, built.stderr
    files = [str(out / name) for name in DASHBOARDS]
    plain = _run(llmpath_bin, "dashboards", "lint", *files)
    assert plain.returncode == 1 and "unknown metric 'slo:sli_error:ratio_rate1m'" in plain.stderr
    same = _run(llmpath_bin, "dashboards", "lint", "--windows", windows, *files)
    assert same.returncode == 0 and "3 dashboard(s) OK" in same.stdout, same.stderr
    period = _run(llmpath_bin, "dashboards", "lint", "--period", "1h", "--windows", windows, *files)
    assert period.returncode == 0, period.stderr


PLUGIN_SPEC = """\
version: "prometheus/v1"
service: shop
slos:
  - name: availability
    objective: 99.5
    sli:
      plugin:
        id: shop_availability
        options: {job: shop}
    alerting:
      name: ShopAvailability
"""

PLUGIN_MODULE = """\
def availability(meta, service_labels, options):
    job = options["job"]
    return (
        f'sum(rate(llmpath_requests_total{{job="{job}",code=~"5.."}}[{{{{.window}}}}]))'
        f' / sum(rate(llmpath_requests_total{{job="{job}"}}[{{{{.window}}}}]))'
    )


SLI_PLUGINS = {"shop_availability": availability}
"""


def test_build_and_lint_load_sli_plugins(llmpath_bin: str, tmp_path: Path) -> None:
    """A spec with an SLI plugin builds dashboards and runbooks with --plugins (as `slo compile` does); without it,
    the error names the option to use, which these commands accept."""
    spec = tmp_path / "shop.yaml"
    spec.write_text(PLUGIN_SPEC)
    plugins = tmp_path / "shop_plugins.py"
    plugins.write_text(PLUGIN_MODULE)
    for part in ("dashboards", "runbooks"):
        out = tmp_path / part
        missing = _run(llmpath_bin, part, "build", "--slo", str(spec), "-o", str(out))
        assert missing.returncode == 1
        assert "SLI plugin 'shop_availability' not found (load it with --plugins MODULE)" in missing.stderr
        built = _run(llmpath_bin, part, "build", "--slo", str(spec), "--plugins", str(plugins), "-o", str(out))
        assert built.returncode == 0, built.stderr
        check = _run(
            llmpath_bin, part, "build", "--slo", str(spec), "--plugins", str(plugins), "-o", str(out), "--check"
        )
        assert check.returncode == 0, check.stderr
    assert sorted(p.name for p in (tmp_path / "runbooks").iterdir()) == [
        "README.md",
        "ShopAvailability-page.md",
        "ShopAvailability-ticket.md",
    ]
    slos = json.loads((tmp_path / "dashboards" / "llmpath-slos.json").read_text())
    assert "shop-availability" in json.dumps(slos)
    files = [str(tmp_path / "dashboards" / name) for name in DASHBOARDS]
    linted = _run(llmpath_bin, "dashboards", "lint", "--slo", str(spec), "--plugins", str(plugins), *files)
    assert linted.returncode == 0 and "3 dashboard(s) OK" in linted.stdout, linted.stderr


def test_runbooks_build_custom_spec_and_urls(llmpath_bin: str, tmp_path: Path) -> None:
    spec = tmp_path / "svc.yaml"
    spec.write_text(
        "version: prometheus/v1\nservice: shop\nslos:\n"
        "  - name: requests-availability\n    objective: 99.5\n"
        "    sli:\n      events:\n"
        '        error_query: sum(rate(llmpath_requests_total{code=~"5.."}[{{.window}}]))\n'
        "        total_query: sum(rate(llmpath_requests_total[{{.window}}]))\n"
        "    alerting:\n      name: ShopAvailability\n"
    )
    out = tmp_path / "rb"
    result = _run(
        llmpath_bin, "runbooks", "build", "--slo", str(spec), "-o", str(out),
        "--dashboard-base-url", "https://grafana.acme.io",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "ShopAvailability-page.md",
        "ShopAvailability-ticket.md",
    ]
    page = (out / "ShopAvailability-page.md").read_text()
    assert "https://grafana.acme.io/d/llmpath-slos?viewPanel=" in page
    assert "none: the whole request path" in page  # a Sloth spec has no stage: the path entry is used
    assert "gone in **about 2.1 days (50 hours)**" in page
    assert _run(llmpath_bin, "runbooks", "build", "--slo", str(spec), "-o", str(out), "--check").returncode == 1


def test_lint_accepts_generated_dashboards_and_names_problems(llmpath_bin: str, tmp_path: Path) -> None:
    generated = [str(REPO / "dashboards" / "generated" / name) for name in DASHBOARDS]
    ok = _run(llmpath_bin, "dashboards", "lint", *generated)
    assert ok.returncode == 0 and "3 dashboard(s) OK" in ok.stdout, ok.stderr
    edited = json.loads((REPO / "dashboards" / "generated" / "llmpath-api-path.json").read_text())
    edited["schemaVersion"] = "42"
    edited["panels"][1]["targets"][0]["expr"] = "sum(rate(llmpath_request_total[$__rate_interval]))"
    bad = tmp_path / "edited.json"
    bad.write_text(json.dumps(edited))
    (tmp_path / "broken.json").write_text("{not json")
    result = _run(llmpath_bin, "dashboards", "lint", str(bad), str(tmp_path / "broken.json"))
    assert result.returncode == 1
    assert f"{bad}: schemaVersion: '42' is not of type 'integer'" in result.stderr
    assert f"{bad}: panel" in result.stderr and "unknown metric 'llmpath_request_total'" in result.stderr
    assert f"{tmp_path / 'broken.json'}: Expecting property name" in result.stderr


def test_specs_on_custom_histogram_buckets_need_them_given(llmpath_bin: str, tmp_path: Path) -> None:
    """A TTFT threshold that only an instrumentation's own latency_buckets has: refused without `--buckets` (the
    catalog's buckets lack it), built with them, and `--check` hints the full command."""
    from llmpath.slo import default_spec_path

    spec = tmp_path / "slos.yaml"
    spec.write_text(default_spec_path().read_text().replace("threshold: 0.5\n", "threshold: 0.35\n", 1))
    buckets = "llmpath_time_to_first_token_seconds=0.05,0.35,0.7,3"
    for part in ("dashboards", "runbooks"):
        out = tmp_path / f"out-{part}"
        refused = _run(llmpath_bin, part, "build", "--slo", str(spec), "-o", str(out))
        assert refused.returncode == 1
        assert "0.35 s is not a bucket boundary of llmpath_time_to_first_token_seconds" in refused.stderr
        assert not out.exists()
        built = _run(llmpath_bin, part, "build", "--slo", str(spec), "--buckets", buckets, "-o", str(out))
        assert built.returncode == 0, built.stderr
        next(out.iterdir()).unlink()
        stale = _run(llmpath_bin, part, "build", "--slo", str(spec), "--buckets", buckets, "-o", str(out), "--check")
        assert stale.returncode == 1
        assert f"regenerate with: llmpath {part} build --slo {spec} --buckets {buckets} -o {out}" in stale.stderr
