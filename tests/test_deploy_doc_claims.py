"""What docs/deploy.md tells an operator to run, run for real: its ConfigMap command against the dashboards'
real size (kubectl), and what a gateway scrape outage does to the compiled SLO alerts (promtool)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from llmpath.slo.promtool_tests import render_template

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "deploy.md"
#: Kubernetes refuses an object whose annotations exceed 256 KiB; a client-side `kubectl apply` stores the whole
#: object in its `kubectl.kubernetes.io/last-applied-configuration` annotation.
ANNOTATIONS_LIMIT = 256 * 1024
#: The most a ConfigMap may hold.
CONFIGMAP_LIMIT = 1024 * 1024
AVAILABILITY = {"sloth_id": "llm-api-availability", "sloth_service": "llm-api", "sloth_slo": "availability"}


def guide_block(language: str, needle: str) -> str:
    """The one fenced ``language`` block of the deploy guide that contains ``needle``."""
    blocks = re.findall(rf"^```{language}\n(.*?)^```", GUIDE.read_text(encoding="utf-8"), re.S | re.M)
    found = [b for b in blocks if needle in b]
    assert len(found) == 1, f"deploy.md: expected one {language} block containing {needle!r}, found {len(found)}"
    return found[0]


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in ``cwd``; fail the test with its output unless it exits 0."""
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{cmd}: {done.stdout}{done.stderr}"
    return done


def compile_default_rules(llmpath_bin: str, workdir: Path) -> Path:
    """The guide's `llmpath slo compile SPECS -o build/rules` on the spec `llmpath slo init` writes; the rule file."""
    run([llmpath_bin, "slo", "init", "slos.yaml"], workdir)
    run([llmpath_bin, "slo", "compile", "slos.yaml", "-o", "build/rules"], workdir)
    return workdir / "build" / "rules" / "slos.yaml"


def alert_rules(rule_file: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """(alert name, sloth_severity) → the alerting rule."""
    groups = yaml.safe_load(rule_file.read_text())["groups"]
    return {(r["alert"], r["labels"]["sloth_severity"]): r for g in groups for r in g["rules"] if "alert" in r}


def test_dashboards_configmap_needs_the_server_side_apply_the_guide_uses(
    tmp_path: Path, llmpath_bin: str, require_binary
) -> None:
    """The guide's ConfigMap of the three dashboards, made by kubectl itself: too big for the annotation a
    client-side `kubectl apply` writes, small enough for one ConfigMap."""
    kubectl = require_binary("kubectl")
    run([llmpath_bin, "dashboards", "build", "-o", "build/dashboards"], tmp_path)
    block = guide_block("sh", "create configmap llmpath-dashboards")
    create, apply = (part.strip() for part in block.replace("\\\n", " ").splitlines()[0].split("|"))
    assert apply == "kubectl apply --server-side -f -"
    args = create.split()
    assert args[0] == "kubectl" and args[-2:] == ["-o", "yaml"]
    configmap = yaml.safe_load(run([kubectl, *args[1:]], tmp_path).stdout)
    assert sorted(configmap["data"]) == ["llmpath-api-path.json", "llmpath-backends.json", "llmpath-slos.json"]
    size = len(json.dumps(configmap, separators=(",", ":")))
    assert ANNOTATIONS_LIMIT < size < CONFIGMAP_LIMIT, size


def test_a_gateway_scrape_outage_leaves_firing_alerts_to_fade_and_opens_no_data_after_15_minutes(
    tmp_path: Path, llmpath_bin: str, require_binary
) -> None:
    """Half of the requests fail for an hour, then Prometheus scrapes no gateway (last scrape at 60m): the page keeps
    firing for 30 more minutes, the ticket for 6 hours, and the only new alert is the availability no-data ticket,
    15 minutes after the last scrape."""
    promtool = require_binary("promtool")
    rules = alert_rules(compile_default_rules(llmpath_bin, tmp_path))

    def expected(alert: str, severity: str, **labels: str) -> dict[str, Any]:
        rule = rules[(alert, severity)]
        all_labels = {**rule["labels"], **AVAILABILITY, **labels}
        annotations = {k: render_template(v, all_labels) for k, v in rule["annotations"].items()}
        return {"exp_labels": all_labels, "exp_annotations": annotations}

    page = expected("LLMAPIAvailabilityBurn", "page", route="chat")
    ticket = expected("LLMAPIAvailabilityBurn", "ticket", route="chat")
    no_data = expected("LLMAPIAvailabilityNoData", "ticket")
    series = 'llmpath_requests_total{job="llmpath-gateway",instance="a",route="chat",code="%s"}'
    # promtool evaluates the rule groups in no fixed order, so an alert may see the recordings one evaluation late:
    # each change is checked one minute before it is due and one minute after.
    checks: list[tuple[str, str, list[dict[str, Any]]]] = [
        ("60m", "LLMAPIAvailabilityBurn", [page, ticket]),
        ("74m", "LLMAPIAvailabilityNoData", []),
        ("76m", "LLMAPIAvailabilityNoData", [no_data]),
        ("89m", "LLMAPIAvailabilityBurn", [page, ticket]),
        ("91m", "LLMAPIAvailabilityBurn", [ticket]),
        ("6h59m", "LLMAPIAvailabilityBurn", [ticket]),
        ("7h2m", "LLMAPIAvailabilityBurn", []),
    ]
    others = {name for name, _ in rules} - {"LLMAPIAvailabilityBurn", "LLMAPIAvailabilityNoData"}
    checks += [(at, name, []) for name in sorted(others) for at in ("75m", "2h")]
    tests = {
        "rule_files": ["build/rules/slos.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": series % code, "values": "0+60x60 stale"} for code in ("200", "500")],
                "alert_rule_test": [{"eval_time": at, "alertname": a, "exp_alerts": exp} for at, a, exp in checks],
            }
        ],
    }
    (tmp_path / "outage.test.yaml").write_text(yaml.safe_dump(tests))
    run([promtool, "test", "rules", "outage.test.yaml"], tmp_path)
