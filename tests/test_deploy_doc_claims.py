"""What docs/deploy.md tells an operator to run, run for real: its Grafana API loop (jq, curl) and ConfigMap command
(kubectl) on the built dashboards, its prometheus.yml and reload in a real Prometheus, the Prometheus Operator
objects, what a gateway scrape outage does to the compiled SLO alerts (promtool), and its Alertmanager configuration
in a real Alertmanager: routing, inhibition and the notifications' links."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from llmpath.demo.prometheus import find_alertmanager, find_prometheus, start_alertmanager, start_prometheus
from llmpath.demo.supervisor import Supervisor, free_port
from llmpath.slo.promtool_tests import render_template
from tests.loopback import PostRecorder

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


def compile_default_rules(llmpath_bin: str, workdir: Path, *base_urls: str) -> Path:
    """The guide's `llmpath slo compile SPECS -o build/rules` on the spec `llmpath slo init` writes (``base_urls``:
    its `--runbook-base-url` / `--dashboard-base-url` options); the rule file."""
    run([llmpath_bin, "slo", "init", "slos.yaml"], workdir)
    run([llmpath_bin, "slo", "compile", "slos.yaml", "-o", "build/rules", *base_urls], workdir)
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


class Recorder(PostRecorder):
    """The stand-in for Grafana, PagerDuty and Slack."""

    def wait_for(self, count: int, timeout: float = 30.0) -> dict[str, list[dict[str, Any]]]:
        """Path → the bodies posted there, once ``count`` posts have come (fails after ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while len(self.posts()) < count and time.monotonic() < deadline:
            time.sleep(0.2)
        posts = self.posts()
        assert len(posts) == count, posts
        by_path: dict[str, list[dict[str, Any]]] = {}
        for post in posts:
            by_path.setdefault(post.path.strip("/"), []).append(post.body)
        return by_path


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    endpoint = Recorder()
    yield endpoint
    endpoint.close()


RUNBOOKS = "https://github.com/acme/llm-gateway/blob/main/runbooks/generated"
GRAFANA = "https://grafana.example.com"


def test_alertmanager_config_routes_pages_inhibits_their_tickets_and_links_runbook_and_panel(
    tmp_path: Path, llmpath_bin: str, processes: Supervisor, recorder: Recorder
) -> None:
    """The guide's route, inhibition and receivers in Alertmanager, the alerts compiled with absolute base URLs and
    the guide's own gateway rules: a page goes to PagerDuty with both links, its SLO's ticket on the same route is
    inhibited, other tickets (another route, the lost usage records) reach Slack."""
    if find_alertmanager() is None:
        pytest.skip("prometheus-alertmanager not installed (make test installs it via apt-get)")
    rules = alert_rules(
        compile_default_rules(llmpath_bin, tmp_path, "--runbook-base-url", RUNBOOKS, "--dashboard-base-url", GRAFANA)
    )
    gateway_groups = yaml.safe_load(guide_block("yaml", "LLMPathGatewayDown"))["groups"]
    rules.update({(r["alert"], r["labels"]["sloth_severity"]): r for g in gateway_groups for r in g["rules"]})

    config = yaml.safe_load(guide_block("yaml", "inhibit_rules:")) | yaml.safe_load(guide_block("yaml", "receivers:"))
    config["route"]["group_wait"] = "1s"  # the default 30 s, shortened for the test
    pagerduty = config["receivers"][0]["pagerduty_configs"][0]
    slack = config["receivers"][1]["slack_configs"][0]
    assert pagerduty["routing_key_file"] == "/etc/alertmanager/pagerduty.key"
    assert slack["api_url_file"] == "/etc/alertmanager/slack.url"
    (tmp_path / "pagerduty.key").write_text("test-routing-key\n")
    (tmp_path / "slack.url").write_text(recorder.url("slack") + "\n")
    pagerduty["routing_key_file"] = str(tmp_path / "pagerduty.key")
    pagerduty["url"] = recorder.url("pagerduty")
    slack["api_url_file"] = str(tmp_path / "slack.url")
    alertmanager = start_alertmanager(processes, tmp_path, config)

    def alert(name: str, severity: str, **labels: str) -> dict[str, Any]:
        rule = rules[(name, severity)]
        all_labels = {"alertname": name, **rule["labels"], **labels}
        return {
            "labels": all_labels,
            "annotations": {k: render_template(v, all_labels) for k, v in rule["annotations"].items()},
        }

    ttft = {"sloth_id": "llm-api-ttft", "sloth_service": "llm-api", "sloth_slo": "ttft"}
    page = alert("LLMAPITTFTBurn", "page", route="chat", **ttft)
    inhibited = alert("LLMAPITTFTBurn", "ticket", route="chat", **ttft)
    other_route = alert("LLMAPITTFTBurn", "ticket", route="embeddings", **ttft)
    gateway_down = alert("LLMPathGatewayDown", "page")
    records_lost = alert("LLMPathUsageRecordsLost", "ticket", instance="gw-1:8080", sink="jsonl")
    posted = httpx.post(
        f"{alertmanager.url}/api/v2/alerts", json=[page, inhibited, other_route, gateway_down, records_lost]
    )
    assert posted.status_code == 200, posted.text

    sent = recorder.wait_for(4)  # one notification per group: two pages, two tickets
    assert page["annotations"]["runbook_url"] == f"{RUNBOOKS}/LLMAPITTFTBurn-page.md"
    assert page["annotations"]["dashboard_url"].startswith(f"{GRAFANA}/d/llmpath-slos?viewPanel=")
    assert page["annotations"]["dashboard_url"].endswith("&var-route=chat")
    paged = {event["payload"]["summary"]: event for event in sent["pagerduty"]}
    ttft_page = paged[page["annotations"]["summary"]]
    assert ttft_page["routing_key"] == "test-routing-key"
    assert ttft_page["links"] == [
        {"href": page["annotations"]["runbook_url"], "text": "Runbook"},
        {"href": page["annotations"]["dashboard_url"], "text": "Burn-rate panel"},
    ]
    assert gateway_down["annotations"]["summary"] in paged
    titles = sorted(attachment["title"] for post in sent["slack"] for attachment in post["attachments"])
    assert titles == ["LLMAPITTFTBurn (prefill, owner serving)", "LLMPathUsageRecordsLost (owner gateway)"]
    ticket_text = next(a["text"] for p in sent["slack"] for a in p["attachments"] if a["title"].startswith("LLMAPI"))
    runbook = f"{RUNBOOKS}/LLMAPITTFTBurn-ticket.md"
    assert ticket_text == f"{other_route['annotations']['description']} <{runbook}|Runbook>"

    state = {
        (a["labels"]["alertname"], a["labels"].get("route"), a["labels"]["sloth_severity"]): a["status"]
        for a in httpx.get(f"{alertmanager.url}/api/v2/alerts").json()
    }
    assert state[("LLMAPITTFTBurn", "chat", "ticket")]["state"] == "suppressed"
    assert state[("LLMAPITTFTBurn", "chat", "ticket")]["inhibitedBy"]
    for unaffected in (("LLMAPITTFTBurn", "embeddings", "ticket"), ("LLMPathUsageRecordsLost", None, "ticket")):
        assert state[unaffected] == {"state": "active", "inhibitedBy": [], "silencedBy": []}, unaffected


def test_grafana_api_loop_posts_each_dashboard_ready_for_import(
    tmp_path: Path, llmpath_bin: str, require_binary, recorder: Recorder
) -> None:
    """The guide's jq + curl loop, run as written against a stand-in Grafana: one import per dashboard, into the
    folder, overwriting; no numeric `id` (Grafana would look for that dashboard), not editable, and a data source
    variable left on the default Prometheus."""
    require_binary("jq")
    require_binary("curl")
    run([llmpath_bin, "dashboards", "build", "-o", "build/dashboards"], tmp_path)
    env = {**os.environ, "GRAFANA_URL": recorder.url("grafana"), "GRAFANA_TOKEN": "test-token"}
    loop = guide_block("sh", "/api/dashboards/db")
    done = subprocess.run(
        ["bash", "-eo", "pipefail", "-c", loop], cwd=tmp_path, env=env, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert [post.path for post in recorder.posts()] == ["/grafana/api/dashboards/db"] * 3
    assert [post.authorization for post in recorder.posts()] == ["Bearer test-token"] * 3
    uids = set()
    for body in (post.body for post in recorder.posts()):
        assert {k: v for k, v in body.items() if k != "dashboard"} == {"folderUid": "llmpath", "overwrite": True}
        dashboard = body["dashboard"]
        uids.add(dashboard["uid"])
        assert "id" not in dashboard and "__inputs" not in dashboard
        assert dashboard["editable"] is False and dashboard["schemaVersion"] == 42
        (source,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
        assert source["name"] == "datasource" and source["query"] == "prometheus" and "current" not in source
    assert uids == {"llmpath-api-path", "llmpath-slos", "llmpath-backends"}


def test_prometheus_operator_objects_go_to_the_namespace_kubectl_names(tmp_path: Path, llmpath_bin: str) -> None:
    """The guide's `--format prometheus-operator` compile: one PrometheusRule per file with the plain rules' groups,
    no namespace of its own (so `kubectl -n monitoring apply` puts it there) and small enough for a client-side
    apply's annotation."""
    compile_line = guide_block("sh", "--format prometheus-operator").splitlines()[0].split()
    assert compile_line[:3] == ["llmpath", "slo", "compile"] and compile_line[3] == "SPECS"
    plain = yaml.safe_load(compile_default_rules(llmpath_bin, tmp_path).read_text())
    run([llmpath_bin, *compile_line[1:3], "slos.yaml", *compile_line[4:]], tmp_path)
    (rule_file,) = (tmp_path / "build" / "rules-k8s").iterdir()
    (rule,) = yaml.safe_load_all(rule_file.read_text())
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert "namespace" not in rule["metadata"]
    assert rule["spec"]["groups"] == plain["groups"]
    assert len(json.dumps(rule, separators=(",", ":"))) < ANNOTATIONS_LIMIT


def test_prometheus_reload_loads_the_rules_folder_of_the_guides_config(
    tmp_path: Path, llmpath_bin: str, processes: Supervisor, require_binary
) -> None:
    """The guide's prometheus.yml (rule_files glob, Alertmanager) in Prometheus 2.42: the compiled rules and the
    guide's gateway rules copied into the folder load on `POST /-/reload` and evaluate without error; with no
    gateway scraped at all, LLMPathGatewayDown is pending."""
    promtool = require_binary("promtool")
    if find_prometheus() is None:
        pytest.skip("prometheus not installed (make test installs it via apt-get)")
    rule_file = compile_default_rules(llmpath_bin, tmp_path)
    run([promtool, "check", "rules", str(rule_file)], tmp_path)
    rules_dir = tmp_path / "rules" / "llmpath"
    rules_dir.mkdir(parents=True)
    config = yaml.safe_load(guide_block("yaml", "rule_files:"))
    assert config["rule_files"] == ["/etc/prometheus/rules/llmpath/*.yaml"]
    config["rule_files"] = [str(rules_dir / "*.yaml")]
    config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{free_port()}"]
    config["global"] = {"evaluation_interval": "1s"}  # the default 1m, shortened for the test
    prometheus = start_prometheus(processes, tmp_path / "prometheus", config)
    run([promtool, "check", "config", str(prometheus.config_path)], tmp_path)
    client = prometheus.client()
    assert client.rule_groups() == []

    shutil.copy(rule_file, rules_dir)
    (rules_dir / "gateway.yaml").write_text(guide_block("yaml", "LLMPathGatewayDown"))
    assert httpx.post(f"{prometheus.url}/-/reload").status_code == 200
    compiled_groups = [g["name"] for g in yaml.safe_load(rule_file.read_text())["groups"]]
    assert sorted(g["name"] for g in client.rule_groups()) == sorted([*compiled_groups, "llmpath-gateway"])

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rules = [r for g in client.rule_groups() for r in g["rules"]]
        if all(r["health"] != "unknown" for r in rules):
            break
        time.sleep(0.5)
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
    pending = {a["labels"]["alertname"] for a in client.alerts() if a["state"] == "pending"}
    assert "LLMPathGatewayDown" in pending
