"""`llmpath slo status` against a real Prometheus evaluating compiled rules while their alerts fire: one row per
SLO group (route), however many labels its alerts carry; an unknown --service is an unknown answer (exit 2) naming the
services that exist."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from llmpath.demo.prometheus import ScrapeTarget, find_prometheus, prometheus_config, start_prometheus
from llmpath.demo.supervisor import Supervisor
from llmpath.live.promapi import PrometheusClient
from llmpath.live.slo_status import slo_status
from llmpath.slo import CompileOptions, compile_slos, load_specs
from tests.loopback import Answer, Loopback, Request

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
WINDOWS_1H = REPO / "slo" / "examples" / "windows-1h.yaml"
BUDGET = "slo:period_error_budget_remaining:ratio"

# Alerts with labels of their own (routing keys, channels): not groups of the SLO.
LABELLED = """\
version: llmpath/v1
service: labelled
labels: {team: inference}
slos:
  - name: availability
    objective: 99.9
    stage: route
    group_by: [route]
    sli:
      ratio: {bad: 'llmpath_requests_total{code=~"5.."}', total: llmpath_requests_total}
    alerting:
      name: LabelledAvailability
      labels: {category: availability}
      page_alert: {labels: {routing_key: pager, severity: critical}}
      ticket_alert: {labels: {slack_channel: "#llm", severity: warning}}
"""


def _exporter() -> Callable[[Request], Answer]:
    """Counters that grow ten times a second: route chat fails half its requests, docs-qa none; Sloth's
    getting-started service (scraped as job myservice) fails a fifth."""
    started = time.monotonic()

    def scrape(_: Request) -> Answer:
        n = int((time.monotonic() - started) * 10)
        body = (
            "# TYPE llmpath_requests_total counter\n"
            f'llmpath_requests_total{{route="chat",code="200"}} {n * 10}\n'
            f'llmpath_requests_total{{route="chat",code="500"}} {n * 10}\n'
            f'llmpath_requests_total{{route="docs-qa",code="200"}} {n * 5}\n'
            "# TYPE http_request_duration_seconds_count counter\n"
            f'http_request_duration_seconds_count{{code="200"}} {n * 8}\n'
            f'http_request_duration_seconds_count{{code="500"}} {n * 2}\n'
        ).encode()
        return Answer(200, body, {"content-type": "text/plain; version=0.0.4"})

    return scrape


@pytest.fixture(scope="module")
def prometheus_url(tmp_path_factory: pytest.TempPathFactory, sloth_dir: Path) -> Iterator[str]:
    """A Prometheus evaluating the labelled SLO and Sloth's getting-started SLO (1-hour windows) until both fire
    their page and ticket alerts."""
    if find_prometheus() is None:
        pytest.skip("prometheus not installed (make test installs it via apt-get)")
    work = tmp_path_factory.mktemp("status")
    (work / "labelled.yaml").write_text(LABELLED)
    docs = load_specs([work / "labelled.yaml", sloth_dir / "examples" / "getting-started.yml"])
    result = compile_slos(docs, CompileOptions(windows_file=WINDOWS_1H))
    rule_files = []
    for name, text in result.files.items():
        (work / name).write_text(text)
        rule_files.append(work / name)
    with Loopback(_exporter()) as exporter, Supervisor(work / "logs") as supervisor:
        # The job label is the one Sloth's getting-started SLI selects.
        target = ScrapeTarget("myservice", exporter.url.removeprefix("http://"))
        config = prometheus_config([target], rule_files, scrape_interval="1s", evaluation_interval="1s")
        prometheus = start_prometheus(supervisor, work / "prometheus", config)
        with prometheus.client() as client:
            deadline = time.monotonic() + 90
            firing = {(a, s) for a in ("LabelledAvailability", "MyServiceHighErrorRate") for s in ("page", "ticket")}
            # The metadata groups run apart from the alert groups: wait for their budget series too.
            while _firing(client) != firing or len(client.query(BUDGET)) < 3:
                assert time.monotonic() < deadline, f"alerts never fired: {client.alerts()}"
                time.sleep(0.5)
        yield prometheus.url


def _firing(client: PrometheusClient) -> set[tuple[str, str]]:
    return {
        (a["labels"]["alertname"], a["labels"]["sloth_severity"]) for a in client.alerts() if a["state"] == "firing"
    }


def test_alert_labels_do_not_split_an_slo_into_phantom_rows(prometheus_url: str) -> None:
    with PrometheusClient(prometheus_url) as client:
        rows = slo_status(client)
    got = [(r.slo_id, r.group, sorted((a.name, a.severity) for a in r.alerts)) for r in rows]
    assert got == [
        (
            "labelled-availability",
            {"route": "chat"},
            [("LabelledAvailability", "page"), ("LabelledAvailability", "ticket")],
        ),
        ("labelled-availability", {"route": "docs-qa"}, []),
        (
            "myservice-requests-availability",
            {},
            [("MyServiceHighErrorRate", "page"), ("MyServiceHighErrorRate", "ticket")],
        ),
    ]
    chat, docs_qa, sloth = rows
    assert chat.sli == pytest.approx(0.5, abs=0.05) and docs_qa.sli == 1.0
    assert sloth.sli == pytest.approx(0.8, abs=0.05) and sloth.objective == 99.9
    assert chat.stage == "route" and chat.owner == "platform" and sloth.stage == "-"
    budgets_exhausted = [None if r.budget_remaining is None else r.budget_remaining < 0 for r in rows]
    assert budgets_exhausted == [True, False, True]  # 500x and 200x burns: exhausted
    assert chat.burn_rate == pytest.approx(500, rel=0.1) and docs_qa.burn_rate == 0.0


def test_status_cli_names_the_services_when_none_matches(prometheus_url: str, llmpath_bin: str) -> None:
    def status(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [llmpath_bin, "slo", "status", "--prometheus", prometheus_url, *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})

    for as_json in ((), ("--json",)):  # a typo is no "nothing firing": exit 2, nothing on stdout (it said [], 0)
        nope = status("--service", "nope", *as_json)
        assert (nope.returncode, nope.stdout) == (2, ""), nope.stderr
        assert " ".join(nope.stderr.split()) == (
            f"llmpath slo status: no SLO has service 'nope'; services with SLOs in {prometheus_url}: labelled, "
            "myservice"
        )
    firing = status("--service", "myservice", "--firing")
    assert firing.returncode == 0, firing.stderr
    lines = firing.stdout.splitlines()
    assert sum("requests-availability" in line for line in lines) == 1  # one row, not one per alert label set
    assert sum(line.startswith("firing MyServiceHighErrorRate") for line in lines) == 2


def test_status_one_teams_on_call_view_from_the_environment_url(prometheus_url: str, llmpath_bin: str) -> None:
    """`--owner platform --firing` (the URL from LLMPATH_PROMETHEUS_URL): only the platform team's SLO groups where
    an alert fires, not its healthy route nor Sloth's SLO (no owner); `--json` has the same rows; each firing
    alert is one line with its severity, group, stage, team and runbook."""
    env = {**os.environ, "LLMPATH_PROMETHEUS_URL": prometheus_url, "COLUMNS": "200"}

    def status(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [llmpath_bin, "slo", "status", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)

    as_json = status("--owner", "platform", "--firing", "--json")
    assert as_json.returncode == 0, as_json.stderr
    (row,) = json.loads(as_json.stdout)
    assert (row["slo_id"], row["group"], row["stage"], row["owner"]) == (
        "labelled-availability",
        {"route": "chat"},
        "route",
        "platform",
    )
    assert sorted((a["name"], a["severity"], a["runbook_url"]) for a in row["alerts"]) == [
        ("LabelledAvailability", s, f"runbooks/generated/LabelledAvailability-{s}.md") for s in ("page", "ticket")
    ]
    table = status("--owner", "platform", "--firing")
    assert table.returncode == 0, table.stderr
    assert [line for line in table.stdout.splitlines() if line.startswith("firing ")] == [
        f"firing LabelledAvailability ({s}) route=chat: stage route, owner platform — runbook "
        f"runbooks/generated/LabelledAvailability-{s}.md"
        for s in ("page", "ticket")
    ]
    nobody = status("--owner", "serving")
    assert nobody.returncode == 0 and nobody.stdout.strip() == "no SLO owned by 'serving'"
